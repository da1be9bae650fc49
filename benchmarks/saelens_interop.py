"""Cross-check clip_lens's reading and writing of SAELens's layout against SAELens itself.

SAELens pins another TransformerLens than clip_lens, so it runs in its own environment; the two
sides exchange folders and reference outputs through `--dir`:

    python benchmarks/saelens_interop.py write --dir /tmp/x          # clip_lens: our SAEs in SAELens's layout
    /path/to/saelens-venv/bin/python benchmarks/saelens_interop.py saelens --dir /tmp/x
                                                                   # SAELens: loads ours, compares; writes its own
    python benchmarks/saelens_interop.py read --dir /tmp/x           # clip_lens: loads SAELens's, compares

Each comparison prints the largest difference of the latents and of the reconstructions of 32
random inputs. This script imports only torch and safetensors at the top, so that either side runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE = 16, 24
OURS, THEIRS = ("standard", "topk", "jumprelu", "batchtopk"), ("standard", "topk", "jumprelu")


def _differences(label: str, codes: torch.Tensor, recon: torch.Tensor, ref: dict, name: str) -> None:
    print(f"{label:>10}: latents max |diff| {float((codes - ref[f'{name}_codes']).abs().max()):.2e}, "
          f"reconstruction max |diff| {float((recon - ref[f'{name}_recon']).abs().max()):.2e}")


def write_ours(folder: Path) -> None:
    import clip_lens.sae as sae_lib

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, D_IN, generator=gen)
    out = {"x": x}
    for architecture in OURS:
        sae = sae_lib.ARCHITECTURES[architecture](D_IN, D_SAE, **({"k": 4} if "topk" in architecture else {}),
                                                  hook="vision.blocks.3.hook_resid_post", seed=1)
        with torch.no_grad():
            for param in sae.parameters():
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            if hasattr(sae, "threshold"):
                sae.threshold.fill_(0.15)
        sae.eval()
        sae_lib.save(sae, folder / f"ours_{architecture}", layout="saelens", model_name="interop")
        codes = sae.encode(x).detach()
        out[f"{architecture}_codes"], out[f"{architecture}_recon"] = codes, sae.decode(codes).detach()
    save_file(out, str(folder / "ours_outputs.safetensors"))
    print(f"wrote {len(OURS)} SAEs in SAELens's layout to {folder}")


def check_with_saelens(folder: Path) -> None:
    import sae_lens
    from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    print(f"SAELens {sae_lens.__version__} reads clip_lens's folders:")
    ref = load_file(str(folder / "ours_outputs.safetensors"))
    for architecture in OURS:
        sae = SAE.load_from_disk(folder / f"ours_{architecture}")
        codes = sae.encode(ref["x"]).detach()
        _differences(architecture, codes, sae.decode(codes).detach(), ref, architecture)
    gen = torch.Generator().manual_seed(1)
    out = {"x": ref["x"]}
    for name, cls, config, extra in (("standard", StandardSAE, StandardSAEConfig, {}),
                                     ("topk", TopKSAE, TopKSAEConfig, {"k": 5}),
                                     ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig, {})):
        cfg = config(d_in=D_IN, d_sae=D_SAE, **extra)
        cfg.metadata = SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="interop")
        sae = cls(cfg)
        with torch.no_grad():
            for param in sae.parameters():
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(0.3 * torch.rand(D_SAE, generator=gen))
        sae.save_model(folder / f"theirs_{name}")
        codes = sae.encode(ref["x"]).detach()
        out[f"{name}_codes"], out[f"{name}_recon"] = codes, sae.decode(codes).detach()
    save_file(out, str(folder / "theirs_outputs.safetensors"))
    print(f"wrote {len(THEIRS)} SAEs with SAELens's save_model to {folder}")


def read_theirs(folder: Path) -> None:
    import clip_lens.sae as sae_lib

    print("clip_lens reads SAELens's folders:")
    ref = load_file(str(folder / "theirs_outputs.safetensors"))
    for name in THEIRS:
        sae = sae_lib.load(folder / f"theirs_{name}", tower="vision")
        codes = sae.encode(ref["x"]).detach()
        _differences(name, codes, sae.decode(codes).detach(), ref, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=["write", "saelens", "read"])
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    {"write": write_ours, "saelens": check_with_saelens, "read": read_theirs}[args.side](args.dir)


if __name__ == "__main__":
    main()
