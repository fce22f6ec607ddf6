"""Reproducible training of the reference localisation model (needs the ``train`` extra: torch).

    python -m heimdall_inference.lab.training --out heimdall_inference/models --scenes 200000 --seed 7

1. Simulate ``--scenes`` training scenes (:mod:`simulator`, :mod:`dataset`): the IQ goes through the
   wire quantisation and the worker's own feature plan, built from the metadata this script writes.
2. Train a small network with the Gaussian negative log-likelihood of a full 2x2 covariance:
   per-receiver encoder (shared weights) over time-pooled log-mel statistics and the band power,
   masked by receiver presence, then a head over all receiver slots (the slot carries the
   geometry) that outputs the mean and (log sigma_e, log sigma_n, correlation).
3. Export ONNX (inputs ``features`` [B, R, M, T], ``mask`` [B, R]; outputs ``mean`` [B, 2] metres,
   ``cov`` [B, 3]) with the metadata document in ``metadata_props["heimdall"]``.
4. Evaluate on held-out scenes (:mod:`evaluation`, including the grid posterior and the Cramér-Rao
   bound), store the figures in the metadata's model card and write ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .dataset import observe
from ..core.features import FeatureConfig, FeaturePlan
from ..core.network import reference_network
from ..core.session import ModelSession
from .simulator import Priors, SignalConfig
from ..core.spec import METADATA_KEY, ModelSpec

MODEL_FILE = "localization_model.onnx"
POSITION_SCALE_M = 50_000.0  #: the head's outputs are in units of 50 km
SIGMA_BIAS_M = 20_000.0  #: the head's log-sigma outputs are relative to 20 km


def default_spec(version: str = "1") -> ModelSpec:
    """Metadata for a model trained on the reference network and the simulator's defaults."""
    signal = SignalConfig()
    return ModelSpec(
        name="localization_model", version=version, network=reference_network(),
        features=FeatureConfig(sample_rate_hz=signal.sample_rate_hz, snippet_samples=signal.snippet_samples,
                               full_scale_dbm=signal.full_scale_dbm, n_fft=256, hop=128, window="hann",
                               n_mels=32, fmin_hz=0.0, fmax_hz=signal.sample_rate_hz / 2,
                               floor_dbm=-160.0, offset_db=-120.0, scale_db=20.0),
        bands_hz=((144.0e6, 146.0e6),), min_receivers=3,
    )


def _chunk(args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec_json, count, seed = args
    spec = ModelSpec.from_json(spec_json)
    obs = observe(spec.network, FeaturePlan(spec.features), count, seed)
    return obs.features, obs.mask, obs.target


def simulate_dataset(spec: ModelSpec, scenes: int, seed: int, workers: int = 2, chunk: int = 2048,
                     cache: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, masks and targets of ``scenes`` simulated scenes, generated in parallel chunks.

    Chunk ``k`` always has the seed ``seed * 1_000_003 + k``, so a larger set extends a smaller one;
    with ``cache`` each chunk is kept as ``.npz`` (keyed by the spec, priors and signal) and reused.
    """
    tag = hashlib.sha1(json.dumps([spec.features.to_dict(), spec.network.to_dict(), Priors().__dict__,
                                   SignalConfig().__dict__], sort_keys=True).encode()).hexdigest()[:10]
    jobs = [(spec.to_json(), min(chunk, scenes - i), seed * 1_000_003 + k)
            for k, i in enumerate(range(0, scenes, chunk))]
    names = [cache / f"chunk_{tag}_{s}_{n}.npz" if cache else None for _, n, s in jobs]
    todo = [j for j, n in zip(jobs, names) if n is None or not n.exists()]
    made = {}
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            made = dict(zip([j[2] for j in todo], pool.map(_chunk, todo)))
    parts = []
    for (_, _, s), name in zip(jobs, names):
        if s in made:
            part = made[s]
            if name is not None:
                name.parent.mkdir(parents=True, exist_ok=True)
                np.savez(name, f=part[0], m=part[1], t=part[2])
        else:
            with np.load(name) as z:
                part = (z["f"], z["m"], z["t"])
        parts.append(part)
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]


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

        def forward(self, features, mask):
            mean_t = features.mean(dim=3)  # [B, R, M]
            std_t = features.std(dim=3, unbiased=False)
            db = features * scale_db + offset_db
            # band power (dB) of the snippet: 10 log10(mean_t sum_m 10^(db/10)), in normalised units
            lse = torch.logsumexp(db * self.ln10_10, dim=3)  # [B, R, M]
            band = torch.logsumexp(lse, dim=2) / self.ln10_10 - 10.0 * math.log10(features.shape[3])
            band_n = ((band - offset_db) / scale_db).unsqueeze(-1)
            x = torch.cat([mean_t, std_t, band_n], dim=2)
            m = mask.unsqueeze(-1)
            h = self.enc(x) * m
            h = torch.cat([h, band_n * m], dim=2).flatten(1)
            out = self.head(torch.cat([h, mask], dim=1))
            mean = out[:, 0:2] * POSITION_SCALE_M
            log_sigma = out[:, 2:4] + math.log(SIGMA_BIAS_M)
            rho = 0.98 * torch.tanh(out[:, 4:5])
            return mean, torch.cat([log_sigma, rho], dim=1)

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


def train(features: np.ndarray, mask: np.ndarray, target: np.ndarray, spec: ModelSpec, *, epochs: int,
          seed: int, batch: int = 512, lr: float = 2e-3, log=print):
    """Fit the network; returns the trained module (in eval mode)."""
    import torch

    torch.manual_seed(seed)
    n_val = max(1, len(features) // 20)
    tf, tm, tt = (torch.from_numpy(a) for a in (features, mask, target))
    model = build_network(mask.shape[1], spec.features.n_mels, spec.features.offset_db, spec.features.scale_db)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * math.ceil((len(features) - n_val) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    best = (math.inf, None)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(features) - n_val, generator=gen) + n_val
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            mean, cov = model(tf[idx], tm[idx])
            loss = gaussian_nll(mean, cov, tt[idx]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        model.eval()
        with torch.no_grad():
            mean, cov = model(tf[:n_val], tm[:n_val])
            val = float(gaussian_nll(mean, cov, tt[:n_val]).mean())
            err = torch.linalg.norm(mean - tt[:n_val], dim=1).median().item() / 1000
        log(f"epoch {epoch + 1}/{epochs} train nll {total / len(perm):.3f} val nll {val:.3f} "
            f"val median error {err:.1f} km")
        if val < best[0]:
            best = (val, {k: v.detach().clone() for k, v in model.state_dict().items()})
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
    from ..core.session import ModelSession
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m heimdall_inference.lab.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("heimdall_inference/models"))
    ap.add_argument("--scenes", type=int, default=400_000)
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--version", default="1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-scenes", type=int, default=1000)
    ap.add_argument("--eval-seed", type=int, default=2026)
    ap.add_argument("--calibrate-only", action="store_true",
                    help="keep the model in --out; refit its predictive family, re-evaluate, rewrite the card")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the simulated training chunks here (.npz) and reuse them")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.workers)
    spec = default_spec(args.version)
    t0 = time.perf_counter()
    features, mask, target = simulate_dataset(spec, args.scenes, args.seed, args.workers, cache=args.cache)
    print(f"training set: {len(features)} scenes ({time.perf_counter() - t0:.0f} s)")
    n_val = max(1, len(features) // 20)  # the split train() holds out
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / MODEL_FILE
    if args.calibrate_only:
        spec = ModelSession(path).spec
    else:
        t0 = time.perf_counter()
        model = train(features, mask, target, spec, epochs=args.epochs, seed=args.seed)
        train_s = time.perf_counter() - t0
        training = {"scenes": args.scenes, "epochs": args.epochs, "seed": args.seed, "train_s": round(train_s, 1),
                    "torch": torch.__version__, "priors": Priors().__dict__, "signal": SignalConfig().__dict__}
        spec = ModelSpec(**{**spec.__dict__, "training": json.loads(json.dumps(training))})
        export_onnx(model, spec, path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    uncertainty = calibrate(path, features[:n_val], mask[:n_val], target[:n_val])
    print(f"predictive family from {n_val} held-out training scenes: {uncertainty}")
    spec = ModelSpec(**{**spec.__dict__, "uncertainty": uncertainty})
    write_metadata(path, spec)
    if args.eval_scenes:
        from .evaluation import evaluate, write_model_card

        report = evaluate(path, scenes=args.eval_scenes, seed=args.eval_seed)
        spec = ModelSpec(**{**spec.__dict__, "card": report.card()})
        write_metadata(path, spec)
        write_model_card(report, spec, args.out / "MODEL_CARD.md")
        print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
