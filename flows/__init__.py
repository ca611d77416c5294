from clip_fp8 import check_same_tree

check_same_tree(__name__, __file__)
