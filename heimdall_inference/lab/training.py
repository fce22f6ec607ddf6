"""Reproducible training of a band's reference localisation model (needs the ``train`` extra: torch).

    python -m heimdall_inference.lab.training --band 2m --out heimdall_inference/models --cache .train-cache
    python -m heimdall_inference.lab.training --band 70cm --out heimdall_inference/models --cache .train-cache

1. Simulate ``--scenes`` training scenes (:mod:`simulator`, :mod:`dataset`) from a mixture of worlds of the
   band: a share ``--wide-share`` from the wide world (faraway, weak and strong transmitters, other exponents
   and spreads, miscalibrated and deaf receivers), the rest from the nominal one. The IQ goes through the wire
   quantisation and the worker's own feature plan, built from the metadata this script writes; each scene's
   features are reduced at once to what the network's first layer reads (its time statistics), so 400,000
   scenes fit in memory.
2. Train a small network with the Gaussian negative log-likelihood of a full 2x2 covariance:
   per-receiver encoder (shared weights) over time-pooled log-mel statistics and the band power,
   masked by receiver presence, then a head over all receiver slots (the slot carries the
   geometry) that outputs the mean and (log sigma_e, log sigma_n, correlation).
3. Export ONNX (inputs ``features`` [B, R, M, T], ``mask`` [B, R]; outputs ``mean`` [B, 2] metres,
   ``cov`` [B, 3]) with the metadata document in ``metadata_props["heimdall"]``.
4. Fit the predictive family (Student-t degrees of freedom) on held-out scenes of the same mixture, through
   onnxruntime; evaluate on held-out scenes of each world (:mod:`evaluation`, including the grid posterior
   and the Cramér-Rao bound); store the figures in the metadata's model card and write the card
   (``MODEL_CARD.md`` / ``MODEL_CARD_70cm.md``) with its reliability diagram.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .dataset import observe
from ..core.features import FeatureConfig, FeaturePlan
from ..core.network import reference_network
from ..core.session import ModelSession, card_path, shipped_model_path
from .simulator import BANDS, Priors, SignalConfig
from ..core.spec import METADATA_KEY, ModelSpec

POSITION_SCALE_M = 50_000.0  #: the head's outputs are in units of 50 km
SIGMA_BIAS_M = 20_000.0  #: the head's log-sigma outputs are relative to 20 km
MODEL_NAMES = {"2m": "localization_model", "70cm": "localization_model_70cm"}
"""Each band's model name (the registry's and the shipped file's: ``<name>.onnx``)."""
_WORLD_SEED = {"nominal": 0, "wide": 500_000}  #: chunk seed offsets: each world's chunks have seeds of their own
_HELD_OUT_SEED = 900_000  #: and the held-out chunks (predictive family) too


def default_spec(version: str = "1", band: str = "2m") -> ModelSpec:
    """Metadata for a model trained on the reference network and the simulator's signal, in ``band``."""
    signal = SignalConfig()
    return ModelSpec(
        name=MODEL_NAMES[band], version=version, network=reference_network(),
        features=FeatureConfig(sample_rate_hz=signal.sample_rate_hz, snippet_samples=signal.snippet_samples,
                               full_scale_dbm=signal.full_scale_dbm, n_fft=256, hop=128, window="hann",
                               n_mels=32, fmin_hz=0.0, fmax_hz=signal.sample_rate_hz / 2,
                               floor_dbm=-160.0, offset_db=-120.0, scale_db=20.0),
        bands_hz=(BANDS[band],), min_receivers=3,
    )


def summarize(features: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """[S, R, M, T] features -> [S, R, 2M + 1] what the network's encoder reads: the mean and spread over time of
    each mel band and the snippet's band power (computed by the network's own torch code, so the exported graph,
    which starts from the features, is the one trained)."""
    import torch

    net = build_network(features.shape[1], spec.features.n_mels, spec.features.offset_db, spec.features.scale_db)
    with torch.no_grad():
        return net.stats(torch.from_numpy(np.ascontiguousarray(features))).numpy()


def _chunk(args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec_json, priors, count, seed = args
    spec = ModelSpec.from_json(spec_json)
    obs = observe(spec.network, FeaturePlan(spec.features), count, seed, priors=priors)
    return obs.features, obs.mask, obs.target


def simulate_dataset(spec: ModelSpec, plan: list[tuple[Priors, int, int]], workers: int = 2, chunk: int = 2048,
                     cache: Path | None = None, reduce: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, masks and targets of the scenes of ``plan`` [(priors, scenes, seed)], simulated in parallel chunks.

    Chunk ``k`` of a plan entry has the seed ``seed * 1_000_003 + k``, so a larger set extends a smaller one; with
    ``cache`` each chunk is kept as ``.npz`` (keyed by the spec's features and network, the priors and the signal)
    and reused. ``reduce``: each chunk's features become :func:`summarize`'s statistics as soon as they exist.
    """
    jobs, names = [], []
    for priors, scenes, seed in plan:
        tag = hashlib.sha1(json.dumps([spec.features.to_dict(), spec.network.to_dict(), priors.to_dict(),
                                       SignalConfig().__dict__], sort_keys=True).encode()).hexdigest()[:10]
        for k, i in enumerate(range(0, scenes, chunk)):
            n, s = min(chunk, scenes - i), seed * 1_000_003 + k
            jobs.append((spec.to_json(), priors, n, s))
            names.append(cache / f"chunk_{tag}_{s}_{n}.npz" if cache else None)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(jobs)
    todo = []
    for j, name in enumerate(names):
        if name is not None and name.exists():
            with np.load(name) as z:
                parts[j] = (summarize(z["f"], spec) if reduce else z["f"], z["m"], z["t"])
        else:
            todo.append(j)
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            for j, part in zip(todo, pool.map(_chunk, [jobs[j] for j in todo])):
                if names[j] is not None:
                    names[j].parent.mkdir(parents=True, exist_ok=True)
                    np.savez(names[j], f=part[0], m=part[1], t=part[2])
                parts[j] = (summarize(part[0], spec) if reduce else part[0], part[1], part[2])
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[index,return-value]


def build_network(n_receivers: int, n_mels: int, offset_db: float, scale_db: float):
    """The torch module (imported lazily: torch is a training-only dependency)."""
    import torch
    from torch import nn

    class Localizer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(2 * n_mels + 1, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU())
            self.head = nn.Sequential(
                nn.Linear(n_receivers * 33 + n_receivers, 256), nn.GELU(),
                nn.Linear(256, 256), nn.GELU(),
                nn.Linear(256, 128), nn.GELU(),
                nn.Linear(128, 5),
            )
            self.ln10_10 = math.log(10.0) / 10.0

        def stats(self, features):
            """[B, R, M, T] -> [B, R, 2M + 1]: per mel band the mean and spread over time, and the band power."""
            mean_t = features.mean(dim=3)  # [B, R, M]
            std_t = features.std(dim=3, unbiased=False)
            db = features * scale_db + offset_db
            # band power (dB) of the snippet: 10 log10(mean_t sum_m 10^(db/10)), in normalised units
            lse = torch.logsumexp(db * self.ln10_10, dim=3)  # [B, R, M]
            band = torch.logsumexp(lse, dim=2) / self.ln10_10 - 10.0 * math.log10(features.shape[3])
            band_n = ((band - offset_db) / scale_db).unsqueeze(-1)
            return torch.cat([mean_t, std_t, band_n], dim=2)

        def from_stats(self, x, mask):
            m = mask.unsqueeze(-1)
            h = self.enc(x) * m
            h = torch.cat([h, x[:, :, -1:] * m], dim=2).flatten(1)
            out = self.head(torch.cat([h, mask], dim=1))
            mean = out[:, 0:2] * POSITION_SCALE_M
            log_sigma = out[:, 2:4] + math.log(SIGMA_BIAS_M)
            rho = 0.98 * torch.tanh(out[:, 4:5])
            return mean, torch.cat([log_sigma, rho], dim=1)

        def forward(self, features, mask):
            return self.from_stats(self.stats(features), mask)

    return Localizer()


def gaussian_nll(mean, cov, target):
    """Negative log-likelihood of a 2-D Gaussian with (log sigma_e, log sigma_n, rho), per sample."""
    import torch

    ls_e, ls_n, rho = cov[:, 0], cov[:, 1], cov[:, 2]
    ze = (target[:, 0] - mean[:, 0]) / torch.exp(ls_e)
    zn = (target[:, 1] - mean[:, 1]) / torch.exp(ls_n)
    one_m = 1.0 - rho * rho
    q = (ze * ze - 2.0 * rho * ze * zn + zn * zn) / one_m
    return ls_e + ls_n + 0.5 * torch.log(one_m) + 0.5 * q


def train(stats: np.ndarray, mask: np.ndarray, target: np.ndarray, spec: ModelSpec, *, epochs: int,
          seed: int, batch: int = 512, lr: float = 2e-3, log=print):
    """Fit the network on :func:`summarize`'s statistics; returns the trained module (in eval mode). A twentieth of
    the scenes (a stride through the set, so every world is in it) is held out to pick the best epoch."""
    import torch

    torch.manual_seed(seed)
    val = np.arange(len(stats)) % 20 == 0
    tf, tm, tt = (torch.from_numpy(np.ascontiguousarray(a[~val])) for a in (stats, mask, target))
    vf, vm, vt = (torch.from_numpy(np.ascontiguousarray(a[val])) for a in (stats, mask, target))
    model = build_network(mask.shape[1], spec.features.n_mels, spec.features.offset_db, spec.features.scale_db)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * math.ceil(len(tf) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    best = (math.inf, None)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(tf), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            mean, cov = model.from_stats(tf[idx], tm[idx])
            loss = gaussian_nll(mean, cov, tt[idx]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            mean, cov = model.from_stats(vf, vm)
            nll = float(gaussian_nll(mean, cov, vt).mean())
            err = torch.linalg.norm(mean - vt, dim=1).median().item() / 1000
        log(f"epoch {epoch + 1}/{epochs} train nll {total / len(perm):.3f} val nll {nll:.3f} "
            f"val median error {err:.1f} km")
        if nll < best[0]:
            best = (nll, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])  # the epoch with the best held-out likelihood
    log(f"kept the epoch with val nll {best[0]:.3f}")
    return model


def export_onnx(model, spec: ModelSpec, path: Path) -> None:
    """Write the ONNX graph with dynamic batch, then the metadata document."""
    import torch

    r = len(spec.network)
    dummy = (torch.zeros(2, r, spec.features.n_mels, spec.features.frames), torch.ones(2, r))
    torch.onnx.export(model, dummy, str(path), input_names=["features", "mask"], output_names=["mean", "cov"],
                      dynamic_axes={"features": {0: "batch"}, "mask": {0: "batch"}, "mean": {0: "batch"},
                                    "cov": {0: "batch"}}, opset_version=17, dynamo=False)
    write_metadata(path, spec)


def write_metadata(path: Path, spec: ModelSpec) -> None:
    """Replace the model's ``metadata_props["heimdall"]`` with ``spec`` (the graph is untouched)."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    proto.producer_name = "heimdall_inference.lab.training"
    proto.doc_string = f"{spec.name} v{spec.version}: power-based transmitter localisation"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def fit_dof(d2: np.ndarray) -> float:
    """Maximum-likelihood degrees of freedom of a 2-D Student-t, given squared Mahalanobis distances.

    Under a Student-t with covariance P and ``nu`` dof, ``d2 * nu / (2 (nu - 2))`` is F(2, nu); only
    ``nu`` is fitted (the covariance is the network's). A large ``nu`` means Gaussian errors.
    """
    from scipy import optimize, stats

    d2 = np.asarray(d2, float)
    d2 = d2[np.isfinite(d2)]

    def nll(log_excess: float) -> float:
        nu = 2.0 + np.exp(log_excess)
        scale = nu / (2.0 * (nu - 2.0))
        return -float(np.sum(stats.f.logpdf(d2 * scale, 2, nu) + np.log(scale)))

    res = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(2000.0)), method="bounded")
    return float(2.0 + np.exp(res.x))


def calibrate(path: Path, features: np.ndarray, mask: np.ndarray, target: np.ndarray) -> dict:
    """Fit the predictive family on held-out scenes through onnxruntime (the shipped graph itself)."""
    from ..core.uncertainty import covariance_from_params, mahalanobis_sq

    sess = ModelSession(path)
    d2 = []
    for i in range(0, len(features), 4096):
        mean, params = sess.run(np.ascontiguousarray(features[i:i + 4096]), np.ascontiguousarray(mask[i:i + 4096]))
        d2.append(mahalanobis_sq(target[i:i + 4096] - mean.astype(float), covariance_from_params(params)))
    nu = fit_dof(np.concatenate(d2))
    if nu > 500:
        return {"family": "gaussian", "fitted_on_scenes": len(features)}
    return {"family": "student_t", "dof": round(nu, 3), "fitted_on_scenes": len(features)}


def quality_thresholds(path: Path, band: str, *, scenes: int = 2000, seed: int = 1000) -> dict[str, float]:
    """The quality flag's residual thresholds for this model (:mod:`heimdall_inference.core.quality`): the 95th and
    99.5th percentiles of the residual of its fixes on the band's nominal world, through the real payload path."""
    from ..core.localizer import Localizer
    from .simulator import scene_payloads, simulate

    loc = Localizer(path)
    sc, iq = simulate(loc.spec.network, scenes, seed, priors=Priors.nominal(band))
    docs = scene_payloads(sc, iq, loc.spec.network, SignalConfig(), seed=seed, binary=True)
    del iq
    residuals = []
    for i in range(0, scenes, 256):
        fixes = loc.fixes([loc.decode(d) for d in docs[i:i + 256]])
        residuals += [f["quality"]["residual_db"] for f in fixes if isinstance(f, dict)]
    res = np.array([r for r in residuals if r is not None])
    return {"fair_residual_db": round(float(np.percentile(res, 95)), 1),
            "poor_residual_db": round(float(np.percentile(res, 99.5)), 1), "measured_on_scenes": float(len(res))}


def world_plan(band: str, scenes: int, wide_share: float, seed: int, offset: int = 0) -> list[tuple[Priors, int, int]]:
    """The training mixture: (priors, scenes, chunk seed base) per world of ``band``."""
    wide = int(round(scenes * wide_share))
    out = [(Priors.nominal(band), scenes - wide, seed + _WORLD_SEED["nominal"] + offset),
           (Priors.wide(band), wide, seed + _WORLD_SEED["wide"] + offset)]
    return [entry for entry in out if entry[1] > 0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m heimdall_inference.lab.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--band", choices=sorted(BANDS), default="2m")
    ap.add_argument("--out", type=Path, default=Path("heimdall_inference/models"))
    ap.add_argument("--scenes", type=int, default=400_000)
    ap.add_argument("--wide-share", type=float, default=0.8,
                    help="share of the training scenes drawn from the wide world (the rest: the nominal one)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--version", default="1")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--held-out-scenes", type=int, default=20_000, help="for the predictive family's fit")
    ap.add_argument("--eval-scenes", type=int, default=1000, help="per world; 0: no evaluation, no card")
    ap.add_argument("--quality-scenes", type=int, default=2000,
                    help="nominal scenes whose residuals set the quality flag's thresholds")
    ap.add_argument("--eval-seed", type=int, default=2026)
    ap.add_argument("--calibrate-only", action="store_true",
                    help="keep the model in --out; refit its predictive family, re-evaluate, rewrite the card")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the simulated training chunks here (.npz) and reuse them")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.workers)
    spec = default_spec(args.version, args.band)
    path = args.out / shipped_model_path(args.band).name
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    held = simulate_dataset(spec, world_plan(args.band, args.held_out_scenes, args.wide_share, args.seed,
                                             _HELD_OUT_SEED), args.workers, cache=args.cache, reduce=False)
    if args.calibrate_only:
        spec = ModelSession(path).spec
    else:
        stats, mask, target = simulate_dataset(spec, world_plan(args.band, args.scenes, args.wide_share, args.seed),
                                               args.workers, cache=args.cache)
        simulate_s = time.perf_counter() - t0
        print(f"training set: {len(stats)} scenes, held out: {len(held[0])} ({simulate_s:.0f} s)")
        t0 = time.perf_counter()
        model = train(stats, mask, target, spec, epochs=args.epochs, seed=args.seed)
        train_s = time.perf_counter() - t0
        worlds = {"nominal": round(1.0 - args.wide_share, 6), "wide": args.wide_share}
        training = {"scenes": args.scenes, "epochs": args.epochs, "seed": args.seed, "train_s": round(train_s, 1),
                    "simulate_s": round(simulate_s, 1), "threads": args.workers, "torch": torch.__version__,
                    "band": args.band, "worlds": {w: v for w, v in worlds.items() if v > 0},
                    "priors": {w: Priors.preset(w, args.band).to_dict() for w in worlds},
                    "signal": SignalConfig().__dict__}
        spec = ModelSpec(**{**spec.__dict__, "training": json.loads(json.dumps(training))})
        export_onnx(model, spec, path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    uncertainty = calibrate(path, *held)
    print(f"predictive family from {len(held[0])} held-out scenes of the training mixture: {uncertainty}")
    spec = ModelSpec(**{**spec.__dict__, "uncertainty": uncertainty})
    write_metadata(path, spec)
    quality = quality_thresholds(path, args.band, scenes=args.quality_scenes)
    print(f"quality flag thresholds on the nominal world: {quality}")
    spec = ModelSpec(**{**spec.__dict__, "quality": quality})
    write_metadata(path, spec)
    if args.eval_scenes:
        from .card import card_figures, plot_reliability, write_model_card
        from .evaluation import evaluate

        reports = []
        for world in ("nominal", "wide"):
            reports.append(evaluate(path, scenes=args.eval_scenes, seed=args.eval_seed,
                                    priors=Priors.preset(world, args.band), workers=args.workers))
            print(reports[-1].table())
        worlds = [r.figures() for r in reports]
        spec = ModelSpec(**{**spec.__dict__, "card": card_figures(worlds)})
        write_metadata(path, spec)
        card = card_path(path)
        figure = card.with_name(f"reliability_{args.band}.png")
        plot_reliability(worlds, figure, f"{spec.name} v{spec.version}: reliability of the ellipses")
        write_model_card(worlds, spec, card, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
