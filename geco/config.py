"""Typed run configuration: dataclasses loaded from YAML, overridden from the command line.

A config file mirrors `Config` (sections data, cigm, geco, eval, runtime). Overrides are
`section.key=value` strings whose values are parsed as YAML (`geco.tau=0.5`,
`cigm.betas=[0.5,0.999]`). Unknown keys and wrong types are rejected with the key named, so a
typo never silently falls back to a default. The resolved config is saved with every run and
checkpoint (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geco.data.synth import SynthSpec
from geco.errors import ConfigError


@dataclass
class DataConfig:
    # Dataset folder: files/*.csv + img/<id>.jpg (paper layouts, "standard", or pairs.csv).
    root: str = "data/synthetic"
    kind: str = "auto"  # auto | fashionvc | expreduced | fashiontaobaotb | standard | pairs
    image_size: int = 128  # GECo and CIGM input size (REFERENCE §1.4)
    n_negatives: int = 9
    on_missing_image: str = "error"  # error | skip: rows whose image files are absent (preflight)
    on_bad_image: str = "error"  # error | skip: images that fail to decode during training
    num_workers: int = 2
    # Training pairs streamed from WebDataset shards (`geco data shard`): a folder or an
    # s3://bucket/prefix holding manifest.json; validation and test then read the shards'
    # eval and catalogue sets too, and `root` is not read. Empty = read `root` directly.
    shards: str = ""
    # Generate the synthetic dataset into `root` when it is missing (embedded default).
    synthetic: bool = False
    synth: SynthSpec = field(default_factory=SynthSpec)


@dataclass
class CIGMConfig:
    features: int = 64
    noise_dim: int = 1024
    lambda_l1: float = 100.0
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    epochs: int = 200
    batch_size: int = 64
    init_discriminator: bool = True  # False reproduces the reference (only G is initialised)
    max_steps_per_epoch: int = 0  # 0 = full epoch; >0 caps steps (smoke runs)
    n_samples: int = 8  # validation tops in the per-epoch template grid


@dataclass
class BackboneConfig:
    # "imagenet" (torchvision cache), a local .pth path, an s3:// URI, or "random".
    weights: str = "imagenet"
    allow_random_init: bool = False


@dataclass
class GECoConfig:
    emb_dim: int = 128
    # Loss weights; defaults are the reference README's (REFERENCE §6).
    alpha: float = 0.25
    beta: float = 0.75
    gamma: float = 0.01
    tau: float = 0.1
    reg: str = "reference"  # reference (REFERENCE §3.2) | paper (Eq. 13, plain L2 norm)
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.99])
    lr_step: int = 8
    lr_gamma: float = 0.1
    epochs: int = 50
    batch_size: int = 64
    # Validation metric that picks the best epoch: any key of the evaluation JSON.
    selection_metric: str = "auc_1vs3"
    # True reproduces the reference's normalisation mismatch around the generator (§7 item 1).
    faithful: bool = False
    # InfoNCE over all ranks' positives (global batch) instead of the local batch (paper).
    global_negatives: bool = False
    # CIGM generator checkpoint; empty = <run-dir>/cigm/last.pt.
    cigm_checkpoint: str = ""
    max_steps_per_epoch: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass
class EvalConfig:
    batch_size: int = 128
    seed: int = 1234  # template noise at evaluation is seeded: metrics are reproducible
    ties: str = "expected"  # expected | optimistic | pessimistic


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42  # offset by rank in DDP
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    channels_last: str = "auto"  # auto (on CUDA) | on | off
    deterministic: bool = False
    log_every: int = 20  # steps between progress lines


@dataclass
class ClusterConfig:
    """Ray Train settings (ray_jobs/); ignored by the plain `geco` command."""

    name: str = "geco"  # Ray run names <name>-cigm and <name>-geco; same name = resume
    # Where Ray Train keeps checkpoints and results: s3://bucket/prefix, or a local path every
    # node can see (relative paths resolve against the job's working directory).
    storage_path: str = "runs/ray"
    num_workers: int = 2  # DDP ranks
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    num_to_keep: int = 3  # latest checkpoints kept per stage (each holds best.pt too); 0 = all
    max_failures: int = 2  # worker-group restarts from the last checkpoint; -1 = unlimited
    eval_cpus: float = 1.0  # the test-split evaluation task
    eval_gpus: float = 0.0


@dataclass
class TrackingConfig:
    """MLflow tracking (geco.tracking) of the Ray jobs (ray_jobs/)."""

    enabled: bool = True
    # Tracking server or store; empty = $MLFLOW_TRACKING_URI, else a local sqlite store
    # (sqlite:///<cwd>/runs/mlflow.db).
    uri: str = ""
    experiment: str = "geco"
    # fail | warn: an unreachable server stops the run (named), or the run goes on untracked
    # with a warning; never silently.
    on_error: str = "fail"
    registered_model: str = "geco-retriever"
    # Promotion gate: the candidate's validation metric must beat the champion's by `margin`.
    gate_metric: str = "valid_auc_1vs1"
    gate_margin: float = 0.0


@dataclass
class TuneConfig:
    """Ray Tune sweep of GECo's loss weights and temperature (ray_jobs/tune_geco.py)."""

    search: str = "random"  # random (num_samples draws) | grid (every combination)
    num_samples: int = 8  # random: trials; grid: repeats of the grid
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    betas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    taus: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.05, 0.1, 0.5])
    gamma_min: float = 1e-4  # random: log-uniform in [gamma_min, gamma_max]
    gamma_max: float = 1e-1
    gammas: list[float] = field(default_factory=lambda: [1e-3, 1e-2])  # grid
    # Validation metric that ranks trials (and drives ASHA); never computed on test.
    metric: str = "auc_1vs1"  # auc_1vs1 | mrr_full
    asha: bool = True
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0 = as many as the resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    seed: int = 0  # the random search's draws


@dataclass
class BPRDAEConfig:
    """BPR-DAE, visual only (REFERENCE §5.2): frozen CNN features + two tied autoencoders."""

    # Frozen feature extractor: "alexnet" (AlexNet fc7, 4096-d, the paper; weights from
    # alexnet_weights), "backbone" (GECo's ResNet-18, 512-d, under geco.backbone's weights
    # policy), or "auto": alexnet when its ImageNet file is in the torch cache, else backbone.
    features: str = "auto"
    alexnet_weights: str = "imagenet"  # imagenet (torch hub cache only) | local path | s3://
    image_size: int = 224
    hidden: int = 512
    mu: float = 0.01  # reconstruction weight
    lam: float = 0.01  # L2 weight on the AE parameters
    # hardsigmoid (the reference: -mean hardsigmoid(m_tp - m_tn)) | logsigmoid (original BPR)
    bpr_term: str = "hardsigmoid"
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 30
    batch_size: int = 128  # tops per step; each meets n_negatives rolled in-batch bottoms
    n_negatives: int = 3
    seed: int = 0


@dataclass
class GanCMConfig:
    """MGCM (REFERENCE §5.3) and Pix2PixCM (§5.4): generator (GAN + L1) + pants encoder +
    BPRNet, score alpha·dot(sigmoid projections) + beta·template term, at 64 px."""

    image_size: int = 64  # the networks are defined for 64 px (REFERENCE §5.3)
    features: int = 64  # first conv width; filters f,2f,4f,8f,8f,8f (the reference: 64)
    emb_dim: int = 128
    alpha: float = 1.0  # weight of the dot-product term of the score
    beta: float = 0.01  # weight of the template term of the score
    mu: float = 0.1  # generator adversarial weight
    nu: float = 0.01  # discriminator loss weight
    lambda_l1: float = 10000.0
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.01  # coupled L2 in Adam, as the reference
    epochs: int = 60
    batch_size: int = 420
    n_negatives: int = 3  # rolled in-batch negatives per top
    # True reproduces REFERENCE §7 items 9-10: the discriminator loss's misplaced parenthesis
    # and the template term added as +beta·L1 (a larger distance scores higher). False (the
    # default) trains D on real -> 1, fake -> 0 and scores -beta·L1 (closer = better).
    faithful: bool = False
    max_steps_per_epoch: int = 0  # 0 = full epoch; >0 caps steps (smoke runs)
    seed: int = 0


@dataclass
class BaselinesConfig:
    """The trainable baselines of `geco compare` (geco.baselines)."""

    bpr_dae: BPRDAEConfig = field(default_factory=BPRDAEConfig)
    mgcm: GanCMConfig = field(default_factory=GanCMConfig)
    pix2pixcm: GanCMConfig = field(default_factory=GanCMConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    cigm: CIGMConfig = field(default_factory=CIGMConfig)
    geco: GECoConfig = field(default_factory=GECoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> Config:
        """Reject impossible settings before any work starts."""
        from geco.losses import validate_gan_loss, validate_geco_loss

        g = self.geco
        validate_geco_loss(g.alpha, g.beta, g.gamma, g.tau)
        validate_gan_loss(self.cigm.lambda_l1)
        _choice("data.kind", self.data.kind,
                ("auto", "fashionvc", "expreduced", "fashiontaobaotb", "standard", "pairs"))
        _choice("data.on_missing_image", self.data.on_missing_image, ("error", "skip"))
        _choice("data.on_bad_image", self.data.on_bad_image, ("error", "skip"))
        _choice("geco.reg", g.reg, ("reference", "paper"))
        _choice("geco.selection_metric", g.selection_metric, SELECTION_METRICS)
        _choice("eval.ties", self.eval.ties, ("expected", "optimistic", "pessimistic"))
        _choice("runtime.amp", self.runtime.amp, ("auto", "bf16", "off"))
        _choice("runtime.channels_last", self.runtime.channels_last, ("auto", "on", "off"))
        size = self.data.image_size
        if size < 16 or size & (size - 1):
            raise ConfigError(f"data.image_size={size}: must be a power of two >= 16 (U-Net depth)")
        for key, value in (("cigm.epochs", self.cigm.epochs), ("geco.epochs", g.epochs),
                           ("cigm.batch_size", self.cigm.batch_size),
                           ("geco.batch_size", g.batch_size), ("geco.emb_dim", g.emb_dim),
                           ("eval.batch_size", self.eval.batch_size),
                           ("cigm.features", self.cigm.features), ("geco.lr_step", g.lr_step)):
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        for key, value in (("cigm.lr", self.cigm.lr), ("geco.lr", g.lr)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}={value}: learning rate must be a positive number")
        for key, betas in (("cigm.betas", self.cigm.betas), ("geco.betas", g.betas)):
            if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
                raise ConfigError(f"{key}={betas}: Adam betas must be two numbers in [0, 1)")
        _choice("tracking.on_error", self.tracking.on_error, ("fail", "warn"))
        if not math.isfinite(self.tracking.gate_margin):
            raise ConfigError(f"tracking.gate_margin={self.tracking.gate_margin}: not a number")
        t = self.tune
        _choice("tune.search", t.search, ("random", "grid"))
        _choice("tune.metric", t.metric, ("auc_1vs1", "mrr_full"))
        for key in ("alphas", "betas", "taus", "gammas"):
            values = getattr(t, key)
            if not values or any(not math.isfinite(v) or v < 0 for v in values):
                raise ConfigError(f"tune.{key}={values}: a non-empty list of numbers >= 0")
        if any(v <= 0 for v in t.taus):
            raise ConfigError(f"tune.taus={t.taus}: temperatures must be > 0")
        if not 0 < t.gamma_min <= t.gamma_max:
            raise ConfigError(f"tune.gamma_min/gamma_max={t.gamma_min}/{t.gamma_max}: "
                              "need 0 < gamma_min <= gamma_max")
        if t.num_samples < 1 or t.grace_period < 1 or t.reduction_factor < 2:
            raise ConfigError("tune.num_samples and tune.grace_period must be >= 1, "
                              "tune.reduction_factor >= 2")
        c = self.cluster
        if c.num_workers < 1:
            raise ConfigError(f"cluster.num_workers={c.num_workers}: must be >= 1")
        if c.num_to_keep < 0 or c.max_failures < -1:
            raise ConfigError("cluster.num_to_keep must be >= 0 and cluster.max_failures >= -1")
        if c.cpus_per_worker <= 0 or (c.use_gpu and c.gpus_per_worker <= 0):
            raise ConfigError("cluster.cpus_per_worker (and gpus_per_worker with use_gpu) "
                              "must be > 0")
        if not c.name or "/" in c.name:
            raise ConfigError(f"cluster.name={c.name!r}: a non-empty name without '/'")
        self._validate_baselines()
        if self.data.n_negatives < 3:
            raise ConfigError(f"data.n_negatives={self.data.n_negatives}: AUC-1vs3 needs >= 3")
        return self


    def _validate_baselines(self) -> None:
        b = self.baselines.bpr_dae
        _choice("baselines.bpr_dae.features", b.features, ("auto", "alexnet", "backbone"))
        _choice("baselines.bpr_dae.bpr_term", b.bpr_term, ("hardsigmoid", "logsigmoid"))
        ints = [("baselines.bpr_dae.image_size", b.image_size, 16),
                ("baselines.bpr_dae.hidden", b.hidden, 1),
                ("baselines.bpr_dae.epochs", b.epochs, 1),
                ("baselines.bpr_dae.n_negatives", b.n_negatives, 1),
                ("baselines.bpr_dae.batch_size", b.batch_size, b.n_negatives + 1)]
        floats = [("baselines.bpr_dae.mu", b.mu), ("baselines.bpr_dae.lam", b.lam),
                  ("baselines.bpr_dae.momentum", b.momentum)]
        positive = [("baselines.bpr_dae.lr", b.lr)]
        for name in ("mgcm", "pix2pixcm"):
            g: GanCMConfig = getattr(self.baselines, name)
            k = f"baselines.{name}."
            if g.image_size != 64:
                raise ConfigError(f"{k}image_size={g.image_size}: the MGCM / Pix2PixCM "
                                  "networks are defined for 64 px inputs (REFERENCE §5.3)")
            ints += [(k + "features", g.features, 1), (k + "emb_dim", g.emb_dim, 1),
                     (k + "epochs", g.epochs, 1), (k + "n_negatives", g.n_negatives, 1),
                     (k + "batch_size", g.batch_size, g.n_negatives + 1)]
            floats += [(k + "alpha", g.alpha), (k + "beta", g.beta), (k + "mu", g.mu),
                       (k + "nu", g.nu), (k + "lambda_l1", g.lambda_l1),
                       (k + "weight_decay", g.weight_decay)]
            positive.append((k + "lr", g.lr))
            if len(g.betas) != 2 or not all(0 <= x < 1 for x in g.betas):
                raise ConfigError(f"{k}betas={g.betas}: Adam betas must be two numbers in [0, 1)")
            if g.alpha == 0 and g.beta == 0:
                raise ConfigError(f"{k}alpha and beta are both 0: the score would be constant")
        for key, value, low in ints:
            if value < low:
                raise ConfigError(f"{key}={value}: must be >= {low}"
                                  + (" (rolled negatives need n_negatives + 1 tops per batch)"
                                     if key.endswith("batch_size") else ""))
        for key, value in floats:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}={value}: must be a finite number >= 0")
        for key, value in positive:
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}={value}: learning rate must be a positive number")


# Validation metrics that can pick the best GECo epoch (all "higher is better").
SELECTION_METRICS = ("auc_1vs3", "auc_1vs1", "mrr_1vs9", "mrr_full", "recall_at_1",
                     "recall_at_10", "ndcg_at_10")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin in (list, tuple):
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known in this section: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
        _set_path(tree, key.strip(), value)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)


def with_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config (e.g. an older checkpoint's) with every key added to `Config` since it
    was written filled in with its default: what that run did, as today's code spells it."""
    return _merge(Config().to_dict(), tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
