"""Train the embedded tiny CLIP that `clip-fp8 run` uses by default.

No pretrained CLIP weights can be downloaded where this project is tested, so the default pipeline
runs on a small transformers ``CLIPModel`` trained here, from scratch, on the synthetic shapes data
(``clip_fp8.synthetic``). It is a real CLIP: same architecture, a real BPE ``CLIPTokenizer`` and a
``CLIPImageProcessor``, saved with ``save_pretrained`` as safetensors. Training takes a few minutes
on two CPU cores and must reach >= 90% zero-shot accuracy so the quality gate means something.

    python scripts/train_embedded_clip.py --out clip_fp8/assets/tiny-clip-shapes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from clip_fp8 import synthetic
from clip_fp8.encoders import image_embeds, text_embeds

CONTEXT_LENGTH = 77
MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's normalisation
STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges spell every word of the synthetic captions."""
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in synthetic.vocabulary():
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=CONTEXT_LENGTH)


def build_model(tokenizer: CLIPTokenizer) -> CLIPModel:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            image_size=synthetic.IMAGE_SIZE, patch_size=16,
        ),
        projection_dim=64,
    )
    return CLIPModel(config)


def text_requirements(caption: str) -> tuple:
    """(size, colour, shape, position) a text asserts; None where it says nothing."""
    words = caption.rstrip(".").split()
    size = next((s for s in synthetic.SIZES if s in words), None)
    colour = next(c for c in synthetic.COLOURS if c in words)
    shape = next(s for s in synthetic.SHAPES if s in words)
    position = next((p for p in synthetic.POSITIONS if caption.endswith(p)), None)
    return size, colour, shape, position


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("clip_fp8/assets/tiny-clip-shapes"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pool", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M, vocab {len(tokenizer)}")

    t0 = time.time()
    samples = [synthetic.make_sample(args.seed, i) for i in range(args.pool)]
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = (pixels.float() / 255.0 - mean) / std
    attrs = [text_requirements(s.caption) for s in samples]
    print(f"data pool: {args.pool} images in {time.time() - t0:.1f}s")

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    rng = np.random.default_rng(args.seed)
    model.train()
    for step in range(args.steps):
        idx = rng.integers(0, args.pool, size=args.batch)
        texts = []
        for i in idx:
            if rng.random() < 0.5:
                texts.append(samples[i].caption)
            else:
                template = synthetic.TEMPLATES[rng.integers(len(synthetic.TEMPLATES))]
                texts.append(template.format(c=synthetic.CLASSNAMES[samples[i].label]))
        # Pad to the longest text only: CLIP pools at the first EOS behind a causal mask, so the
        # padding the pipeline adds up to 77 tokens cannot change the embedding.
        tokens = tokenizer(texts, padding="longest", return_tensors="pt")
        # Soft targets: a text is a positive for every image in the batch it truly describes.
        reqs = [text_requirements(t) for t in texts]
        target = torch.tensor(
            [[all(r is None or r == a for r, a in zip(req, attrs[i])) for req in reqs] for i in idx],
            dtype=torch.float32,
        )
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels[idx])
        logits = out.logits_per_image
        loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        loss_t = -(target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)

    model.eval()
    accuracy = zero_shot_accuracy(model, tokenizer, mean, std)
    print(f"zero-shot accuracy on 1000 held-out images: {accuracy:.3f}")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": synthetic.IMAGE_SIZE},
        crop_size={"height": synthetic.IMAGE_SIZE, "width": synthetic.IMAGE_SIZE},
        image_mean=MEAN, image_std=STD,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(args.out)
    print(f"saved to {args.out}")


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, mean, std, n: int = 1000) -> float:
    held_out = [synthetic.make_sample(99_999, i) for i in range(n)]
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in held_out])).permute(0, 3, 1, 2)
    pixels = (pixels.float() / 255.0 - mean) / std
    class_emb = []
    for name in synthetic.CLASSNAMES:
        tok = tokenizer([t.format(c=name) for t in synthetic.TEMPLATES], padding="max_length",
                        max_length=CONTEXT_LENGTH, return_tensors="pt")
        emb = F.normalize(text_embeds(model, tok["input_ids"]), dim=-1).mean(0)
        class_emb.append(F.normalize(emb, dim=0))
    image_emb = F.normalize(image_embeds(model, pixels), dim=-1)
    pred = (image_emb @ torch.stack(class_emb).T).argmax(1)
    labels = torch.tensor([s.label for s in held_out])
    return (pred == labels).float().mean().item()


if __name__ == "__main__":
    main()
