"""Parity of our TransMIL and MHIM-MIL code with the reference implementations (issue 21).

Needs checkouts of the references, which are never committed here (nor reachable from the test
suite): ``szc19990412/TransMIL`` (``models/TransMIL.py``; imports the ``nystrom-attention``
package, a dependency of this project) and the ``v1`` branch of ``DearCaat/MHIM-MIL``
(``modules/``, ``utils.py``; needs ``einops`` and scikit-learn, both installed with this
project). Checks:

- TransMIL: with one seed both build identical weights (same names, shapes, values); each
  state dict loads strictly into the other; on the same weights and bags of several sizes the
  logits agree (max |difference| printed, must be < 1e-5). The reference's ``.cuda()`` on the
  class token is made a no-op here (CPU run); its code is otherwise untouched.
- MHIM-MIL: ``get_mask`` of v1's ``MHIM`` and our ``mask_instances`` pick the same instances
  for the same attention scores and torch seed (each recipe of v1's README, several bag
  sizes); ``ema_update``, ``cosine_scheduler`` and ``SoftTargetCrossEntropy_v2`` give the
  same numbers as ours.

With ``--write-golden`` it writes ``tests/data/mil_reference_golden.json``: the reference's
TransMIL logits for a seeded model and bag, and v1's kept instances for seeded attention, which
``tests/test_mil_models.py`` compares with our code. Example:

    python benchmarks/parity_mil_reference.py --transmil-repo /scratch/TransMIL \\
        --mhim-repo /scratch/MHIM-MIL --write-golden
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from clam_mcmkd.mil import build_model
from clam_mcmkd.mil.mhim import cosine_schedule, ema_update, mask_instances, soft_target_ce
from clam_mcmkd.mil.transmil import TransMIL

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "mil_reference_golden.json"
TOL = 1e-5
# v1 README recipes: (mask_ratio, mask_ratio_l, mask_ratio_h, mask_ratio_hr)
RECIPES = {
    "abmil_c16": (0.5, 0.0, 0.01, 0.5),
    "abmil_tcga": (0.7, 0.2, 0.02, 1.0),
    "transmil_c16": (0.0, 0.8, 0.03, 0.5),
    "transmil_tcga": (0.6, 0.2, 0.02, 1.0),
    "high_only": (0.0, 0.0, 0.1, 0.5),
}
GOLDEN_TRANSMIL = {"seed": 0, "input_seed": 1, "n_instances": 300, "embed_dim": 1024}
GOLDEN_MASK_SIZES = (57, 400)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transmil_parity(repo: Path) -> dict:
    ref_mod = _load(repo / "models" / "TransMIL.py", "reference_transmil")
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference moves the class token to GPU
    torch.manual_seed(0)
    ref = ref_mod.TransMIL(n_classes=2).eval()
    torch.manual_seed(0)
    ours = TransMIL(n_classes=2, embed_dim=1024).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    same_init = list(ref_sd) == list(our_sd) and all(
        torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd
    )
    ours.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(5)  # other weights than the init for the logits check
    other = ref_mod.TransMIL(n_classes=3).eval()
    mine = TransMIL(n_classes=3, embed_dim=1024).eval()
    mine.load_state_dict(other.state_dict(), strict=True)
    diffs = {}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in (1, 2, 3, 100, 257, 1500, 5000):
            x = torch.randn(1, n, 1024, generator=gen)
            diffs[n] = float((other(data=x)["logits"] - mine(x[0])[0]).abs().max())
    g = GOLDEN_TRANSMIL
    torch.manual_seed(g["seed"])
    golden_model = ref_mod.TransMIL(n_classes=2).eval()
    x = torch.randn(
        g["n_instances"], g["embed_dim"], generator=torch.Generator().manual_seed(g["input_seed"])
    )
    with torch.no_grad():
        logits = golden_model(data=x[None])["logits"][0].tolist()
    return {
        "same_seeded_init": same_init,
        "n_params": sum(v.numel() for v in ref_sd.values()),
        "max_abs_logit_diff": diffs,
        "golden": {
            **g,
            "logits": logits,
            "state_dict": {k: list(v.shape) for k, v in ref_sd.items()},
        },
    }


def mhim_parity(repo: Path) -> dict:
    sys.path.insert(0, str(repo))
    from modules.mhim import MHIM, SoftTargetCrossEntropy_v2
    from utils import cosine_scheduler
    from utils import ema_update as ref_ema

    mismatches, cases, golden = [], 0, []
    for name, (r, rl, rh, rhr) in RECIPES.items():
        ref = MHIM(mask_ratio=r, mask_ratio_l=rl, mask_ratio_h=rh, mask_ratio_hr=rhr,
                   baseline="attn")  # fmt: skip
        for n in (9, 57, 400, 3001):
            for seed in range(3):
                attn = torch.randn(1, n, generator=torch.Generator().manual_seed(100 + seed))
                attn = attn.softmax(-1)  # v1's DAttention returns softmaxed scores
                torch.manual_seed(seed)
                len_keep, ids = ref.get_mask(n, 0, attn)
                want = sorted(ids[0, :len_keep].tolist()) if ids is not None else list(range(n))
                torch.manual_seed(seed)
                kept, _ = mask_instances(attn, r, rl, rh, rhr)
                cases += 1
                if kept.tolist() != want:
                    mismatches.append((name, n, seed))
                if n in GOLDEN_MASK_SIZES and seed == 0:
                    golden.append({"recipe": name, "ratios": [r, rl, rh, rhr], "n": n,
                                   "attn_seed": 100, "seed": 0, "kept": want})  # fmt: skip
    sched_ref = cosine_scheduler(0.01, 0.0, epochs=7, niter_per_ep=13)
    sched_diff = float(np.abs(sched_ref - cosine_schedule(0.01, 0.0, 7 * 13)).max())
    torch.manual_seed(0)
    student = build_model("abmil", 2, 64)
    torch.manual_seed(1)
    t_ref, t_ours = build_model("abmil", 2, 64), build_model("abmil", 2, 64)
    t_ours.load_state_dict(t_ref.state_dict())
    ref_ema(student, t_ref, 0.9999)
    ema_update(student, t_ours, 0.9999)
    ema_diff = max(
        float((a - b).abs().max()) for a, b in zip(t_ref.parameters(), t_ours.parameters())
    )
    s, t = torch.randn(1, 512), torch.randn(1, 512)
    ce_diff = float(
        (SoftTargetCrossEntropy_v2(0.1, 1.0)(s, t) - soft_target_ce(s, t, 0.1, 1.0)).abs()
    )
    return {"mask_cases": cases, "mask_mismatches": mismatches, "schedule_max_diff": sched_diff,
            "ema_max_diff": ema_diff, "consistency_loss_diff": ce_diff, "golden": golden}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transmil-repo", type=Path, required=True, help="TransMIL checkout")
    ap.add_argument("--mhim-repo", type=Path, required=True, help="MHIM-MIL v1 checkout")
    ap.add_argument("--write-golden", action="store_true", help=f"write {GOLDEN.name}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tm = transmil_parity(args.transmil_repo)
    mh = mhim_parity(args.mhim_repo)
    worst = max(tm["max_abs_logit_diff"].values())
    print(f"TransMIL: {tm['n_params']} parameters; same seeded init: {tm['same_seeded_init']}; "
          "strict load both ways: ok")  # fmt: skip
    for n, d in tm["max_abs_logit_diff"].items():
        print(f"  bag of {n:5d} instances: max |logit difference| {d:.2e}")
    print(f"MHIM masking: {mh['mask_cases']} cases, {len(mh['mask_mismatches'])} mismatches "
          f"{mh['mask_mismatches'][:5]}")  # fmt: skip
    print(
        f"MHIM schedule max diff {mh['schedule_max_diff']:.1e}, EMA max diff "
        f"{mh['ema_max_diff']:.1e}, consistency loss diff {mh['consistency_loss_diff']:.1e}"
    )
    ok = (tm["same_seeded_init"] and worst < TOL and not mh["mask_mismatches"]
          and mh["schedule_max_diff"] < 1e-12 and mh["ema_max_diff"] == 0
          and mh["consistency_loss_diff"] < 1e-6)  # fmt: skip
    print("PARITY OK" if ok else "PARITY FAILED")
    if args.write_golden and ok:
        golden = {"transmil": tm["golden"], "mhim_masks": mh["golden"],
                  "source": {"transmil": "szc19990412/TransMIL models/TransMIL.py",
                             "mhim": "DearCaat/MHIM-MIL v1 modules/mhim.py"}}  # fmt: skip
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
