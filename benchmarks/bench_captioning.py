"""Captioning speed: clip_lens's decoding against transformers' `generate` on the same
vision-encoder-decoder, in the same run, plus the tiny CLIP's shipped captioner.

    python benchmarks/bench_captioning.py [--images 4] [--tokens 16] [--repeats 3] [--device cpu]

The Hugging Face model has a ViT-B/16-sized CLIP vision encoder and a GPT-2-small-sized decoder with
cross-attention, random weights (built here; no download). Both sides decode the same number of new
tokens (the end token is disabled so that no caption stops early). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import CLIPVisionConfig, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    import clip_lens
    from clip_lens.captioning import HuggingFaceCaptioner, load_captioner
    from clip_lens.data import shapes

    torch.manual_seed(0)
    end = 50_000  # an id the decoder is never asked to produce first: its logit is pushed down below
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=16),
        GPT2Config(add_cross_attention=True, is_decoder=True, bos_token_id=0, eos_token_id=end))
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = 0, end, end
    model = VisionEncoderDecoderModel(config).eval().to(args.device)
    with torch.no_grad():
        model.decoder.lm_head.weight[end] = 0.0
        model.decoder.transformer.wte.weight[end] = 0.0
    captioner = HuggingFaceCaptioner(model)
    pixels = torch.randn(args.images, 3, 224, 224, device=args.device)
    n = args.tokens

    def theirs(beams: int):
        with torch.no_grad():
            return model.generate(pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  num_beams=beams)

    def ours(beams: int):
        return captioner.generate(captioner.features(pixels), max_new_tokens=n, beams=beams)

    print(f"vision-encoder-decoder: CLIP ViT-B/16 encoder + GPT-2-small decoder (random), {args.images} images, "
          f"{n} new tokens, device {args.device}, best of {args.repeats}")
    for beams in (1, 3):
        same = torch.equal(ours(beams), theirs(beams))
        t_theirs, t_ours = best_of(args.repeats, lambda: theirs(beams)), best_of(args.repeats, lambda: ours(beams))
        print(f"  beams {beams}: transformers generate {t_theirs:.2f} s, clip_lens {t_ours:.2f} s, "
              f"ratio {t_ours / t_theirs:.2f}x; same token ids: {same}")

    tiny = clip_lens.HookedCLIP.from_pretrained("clip_lens/tiny-shapes", device=args.device)
    prefix = load_captioner("clip_lens/tiny-shapes-captioner", device=args.device)
    items = [next(shapes.examples(1, seed=s)) for s in range(64)]
    scene_pixels = tiny.to_pixels([shapes.image_of(ex) for ex in items])
    t_embed = best_of(args.repeats, lambda: tiny.encode_image(scene_pixels))
    t_caption = best_of(args.repeats, lambda: prefix.caption(scene_pixels, tiny))
    print(f"tiny CLIP + shipped prefix captioner, 64 scenes: encode_image {t_embed * 1e3:.1f} ms, "
          f"caption (encode + greedy decode) {t_caption * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
