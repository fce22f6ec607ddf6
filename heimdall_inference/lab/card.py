"""The model card: a Markdown page and a reliability diagram (PNG) from the evaluation of every world.

Written by the training script beside the model (``MODEL_CARD.md`` for the 2 m model, ``MODEL_CARD_70cm.md``
for the 70 cm one; :func:`heimdall_inference.core.session.card_path`); the same figures go into the model's
metadata (``card.evaluations.<world>``), so a worker and the registry can tell them without the page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.spec import ModelSpec
from .evaluation import figures_table, receivers_table

__all__ = ["card_figures", "write_model_card", "plot_reliability", "rewrite_card"]

Figures = dict[str, Any]
"""One world's evaluation figures (:meth:`~.evaluation.EvaluationReport.figures`)."""


def card_figures(worlds: Sequence[Figures]) -> dict[str, Any]:
    """The metadata's ``card``: every world's figures by name."""
    return {"evaluations": {f["world"]: f for f in worlds}}


def plot_reliability(worlds: Sequence[Figures], path: Path, title: str) -> None:
    """One panel per world: the share of scenes inside the model's p-ellipse (and the grid posterior's p-HPD region)
    against p, with the 95 % binomial band around the diagonal for the number of scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(worlds), figsize=(4.6 * len(worlds), 4.4), squeeze=False)
    for ax, figures in zip(axes[0], worlds):
        f = figures["reliability"]
        p = np.array(f["levels"])
        n = figures["scenes"]
        band = 1.96 * np.sqrt(p * (1 - p) / n)
        ax.fill_between(p, p - band, p + band, color="0.85", label=f"95 % binomial band ({n} scenes)")
        ax.plot([0, 1], [0, 1], color="0.4", lw=0.8)
        ax.plot(p, np.array(f["model_pct"]) / 100, "o-", color="C0", label="model ellipses")
        if "grid_hpd_pct" in f:
            ax.plot(p, np.array(f["grid_hpd_pct"]) / 100, "s--", color="C1", ms=4,
                    label="grid posterior HPD (the limit)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("nominal coverage p")
        ax.set_ylabel("share of true positions inside")
        ax.set_title(f"{figures['band']}, {figures['world']} world")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_model_card(worlds: Sequence[Figures], spec: ModelSpec, path: Path, figure: Path | None = None) -> None:
    """Markdown model card with every world's figures; ``figure``: the reliability diagram it links to."""
    t = spec.training
    u = spec.uncertainty
    family = (f"Student-t with {u['dof']} degrees of freedom, fitted by maximum likelihood on "
              f"{u.get('fitted_on_scenes')} held-out training scenes (the errors are heavier-tailed than "
              "Gaussian; the ellipse radius is sqrt(2 F.ppf(p, 2, dof) (dof - 2) / dof), which tends to "
              "sqrt(chi2.ppf(p, 2)) as dof grows)" if u.get("family") == "student_t" else
              "Gaussian (ellipse radius sqrt(chi2.ppf(p, 2)))")
    band = worlds[0]["band"] if worlds else "?"
    mixture = t.get("worlds") or {}
    mix = ", ".join(f"{w} {share:.0%}" for w, share in mixture.items()) if mixture else "nominal"
    lo, hi = spec.bands_hz[0]
    sections = []
    for f in worlds:
        sections.append(f"""### {f['world']} world ({f['scenes']} scenes, seed {f['seed']})

```
{figures_table(f)}
```

By number of receivers online:

{receivers_table(f)}
""")
    png = f"![reliability diagram]({figure.name})\n\n" if figure is not None else ""
    text = f"""# Model card: {spec.name} v{spec.version} ({band}, {lo / 1e6:g}-{hi / 1e6:g} MHz)

Power-based localisation of a transmitter in the {band} band from IQ snippets of the {len(spec.network)}-receiver
network `{spec.network.name}` ({', '.join(spec.network.ids)}). Inputs: log-mel features
[batch, {len(spec.network)}, {spec.features.n_mels}, {spec.features.frames}] and a receiver mask; outputs: the
mean east/north (metres from {spec.network.origin_lat:.4f}, {spec.network.origin_lon:.4f}) and a full 2x2
covariance. Trained by `python -m heimdall_inference.lab.training --band {band}` on {t.get('scenes')} simulated
scenes drawn from a mixture of worlds ({mix}; seed {t.get('seed')}, {t.get('epochs')} epochs, torch
{t.get('torch')}, {t.get('train_s')} s of training on {t.get('threads')} cores) with the negative
log-likelihood of a full-covariance Gaussian. Predictive family for
the ellipses: {family}. Physics and priors of each world: `heimdall_inference/lab/simulator.py`.

## Held-out evaluation (through the real payload decoder)

{''.join(sections)}
{png}- *grid posterior*: the Bayes posterior from band power alone, marginalising transmit power,
  path-loss exponent, shadowing and (in the wide world) which receiver, if any, is faulty, under the
  same world's priors (`heimdall_inference/lab/grid.py`); its median error is the limit for power-only
  information. "HPD" is the coverage of its exact highest-density credible regions, which checks the
  reference itself.
- *coverage*: share of scenes whose true position lies inside the 68 % / 95 % ellipse (the model's
  family; the grid posterior's moment ellipses are Gaussian); *worst tercile*: the third of scenes with
  the largest Cramér-Rao bound at the true position (an oracle selection); *worst seen tercile*: the third
  with the largest bound at the model's own estimate, with the receivers online (the geometry an operator
  can see).
- *reliability diagram*: the share of true positions inside the model's p-ellipse for p = 0.1 ... 0.99,
  beside the grid posterior's p-HPD region; a curve under the diagonal is overconfident.
- *CRB*: the Cramér-Rao bound on RMS position error with unknown transmit power (oracle n, sigma).
- cost: wall time per fix on one core (model: decode + features + ONNX, batches of 256).

## Limits

Simulated physics only (log-distance path loss, log-normal shadowing, no terrain, no multipath
fading across the snippet, no interference). Outside the network hull the power-only problem is
ill-posed and both estimators are far off; the ellipse says so, and the fix's quality flag says how far
outside the hull it lies.

```json
{json.dumps(card_figures(worlds), indent=1)}
```
"""
    path.write_text(text)


def rewrite_card(model_path: Path) -> Path:
    """Write a model's card and reliability diagram again from the figures in its metadata (no evaluation)."""
    from ..core.session import ModelSession, card_path

    spec = ModelSession(model_path).spec
    worlds = list((spec.card.get("evaluations") or {}).values())
    card = card_path(Path(model_path))
    figure = card.with_name(f"reliability_{worlds[0]['band']}.png")
    plot_reliability(worlds, figure, f"{spec.name} v{spec.version}: reliability of the ellipses")
    write_model_card(worlds, spec, card, figure)
    return card
