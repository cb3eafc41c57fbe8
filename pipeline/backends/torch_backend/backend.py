"""The PyTorch implementation of the Backend protocol: one rank of a data-parallel strategy
(distributed.strategy: DDP or Horovod, behind parallel.DataParallel)."""

from __future__ import annotations

import contextlib
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.backends.base import (
    NEUTRAL_AVERAGE, STANDING_SEED, NonFiniteError, ReplicaMismatchError, holds_average, latent_noise,
)  # fmt: skip
from pipeline.backends.torch_backend import feed, parallel, weights
from pipeline.backends.torch_backend.average import GeneratorAverage
from pipeline.backends.torch_backend.device import make_deterministic, pick_device, resolve_precision
from pipeline.backends.torch_backend.feed import to_uint8_images
from pipeline.backends.torch_backend.models import build_models, count_parameters
from pipeline.backends.torch_backend.standing import standing_statistics
from pipeline.config import Config
from pipeline.context import RankContext
from pipeline.data.sharding import EpochSharder
from pipeline.data.shards import ShardedImages

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

GENERATOR_FILE = "generator.pt"  # a plain state dict: loads as --netG of the canonical example
GENERATOR_EMA_FILE = "generator_ema.pt"  # the same layout: loads as --netG too
DISCRIMINATOR_FILE = "discriminator.pt"
OPTIMIZERS_FILE = "optimizers.pt"
RNG_FILE = "rng.pt"


class TorchBackend:
    framework = "torch"
    save_is_collective = False

    def __init__(self, cfg: Config, ctx: RankContext, dtype: torch.dtype = torch.float32):
        """`dtype` of parameters and activations; float64 lets tests check the data-parallel
        arithmetic exactly, where float32 rounding is amplified by ReLU kinks and Adam."""
        self.cfg, self.ctx, self.dtype = cfg, ctx, dtype
        make_deterministic(cfg.runtime.deterministic)  # before the first CUDA op
        self.device = pick_device(cfg.runtime.device, ctx.local_rank, ctx.device)
        torch.manual_seed(ctx.process_seed(cfg.train.seed))  # restored from checkpoints on resume
        model, train = cfg.model, cfg.train
        self.netG, self.netD = build_models(
            model.nz, model.ngf, model.ndf, cfg.data.channels, cfg.data.image_size, ctx.init_seed(train.seed)
        )
        self.parallel = parallel.create(cfg.distributed.strategy, ctx.rank, ctx.world_size, self.device)
        # The activations follow the input's layout; the weights' layout is the strategy's to allow.
        self.channels_last_weights = train.channels_last and self.parallel.channels_last_weights
        layout = torch.channels_last if self.channels_last_weights else torch.preserve_format
        self.netG.to(self.device, dtype, memory_format=layout)
        self.netD.to(self.device, dtype, memory_format=layout)
        # netG / netD are the plain modules (state dicts, sampling); trainG / trainD what trains.
        self.compiled = train.compile
        # Every rank keeps the same average, as every rank's G is the same (BatchNorm statistics
        # are made to agree at checkpoints, as G's are). Copied from the plain G before wrap()
        # gives its BatchNorm layers the strategy's collectives: the average never trains.
        self.netG_ema = GeneratorAverage(self.netG, model.g_ema_decay) if model.g_ema_decay else None
        self.trainG = self.parallel.wrap(self.netG, model.sync_batchnorm, self.compiled)
        self.trainD = self.parallel.wrap(self.netD, model.sync_batchnorm, self.compiled)
        # fused=True: given the scaler's found_inf, the fused kernel skips a step on the device,
        # which keeps the non-finite guard free of host syncs (see _step).
        adam = dict(betas=(train.beta1, train.beta2), fused=True)
        self.optG = self.parallel.distributed_optimizer(
            torch.optim.Adam(self.netG.parameters(), lr=train.lr, **adam), self.netG
        )
        self.optD = self.parallel.distributed_optimizer(
            torch.optim.Adam(self.netD.parameters(), lr=train.discriminator_lr, **adam), self.netD
        )
        self.precision = resolve_precision(train.precision, self.device)
        self.fp16 = self.precision.name == "fp16"
        # Under fp16 a dynamic loss scale. Otherwise the scale stays exactly 1 (update(1.0) in
        # train_step): the scaler is there for its device-side skip of a non-finite update.
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16 if self.fp16 else 1.0)
        self.autocast = torch.autocast(
            self.device.type, dtype=_AUTOCAST_DTYPES.get(self.precision.name), enabled=self.precision.autocast
        )
        self.bce = nn.BCEWithLogitsLoss()
        self.device_cache: Optional[bool] = None  # data.device_cache, resolved in batches()
        self.noise = torch.Generator(self.device)  # reseeded every step from (seed, step)
        fixed = torch.Generator().manual_seed(ctx.fixed_noise_seed(train.seed))
        self.fixed_noise = torch.randn(cfg.logging.num_samples, model.nz, 1, 1, generator=fixed).to(self.device, dtype)
        self._broadcast_state()

    # --- training ------------------------------------------------------------------------

    def batches(self, images: ShardedImages, sharder: EpochSharder) -> Iterator[torch.Tensor]:
        """uint8 NHWC batches on the device (data.device_cache: resident there, or prefetched)."""
        self.device_cache = feed.keeps_on_device(self.cfg.data.device_cache, images, self.device)
        if self.device_cache:
            return feed.resident_batches(images, sharder, self.device)
        return feed.prefetched_batches(images, sharder, self.device)

    def _step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, params) -> torch.Tensor:
        """Backward and update, skipped on every rank when the loss or a gradient is not finite;
        returns that flag as a device tensor (no host sync)."""
        optimizer.zero_grad()  # set_to_none, torch's default (Horovod's optimizer takes no arguments)
        loss_bad = ~torch.isfinite(loss.detach())
        # A NaN-seeded backward turns a non-finite loss into NaN gradients (an inf loss can have
        # finite ones), and the gradients' all-reduce hands them to every rank: all ranks skip together.
        self.scaler.scale(loss * torch.where(loss_bad, torch.nan, 1.0)).backward()
        with self.parallel.gradients_reduced(optimizer):
            if self.fp16:
                # Under float16 an overflowing gradient is routine: the scaler skips that update
                # and lowers its scale. Only a non-finite loss counts as a failure.
                self.scaler.step(optimizer)
                return loss_bad.float()
            self.scaler.unscale_(optimizer)  # a multiplication by 1 that records non-finite gradients
            grads = [p.grad for p in params if p.grad is not None]
            bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
            self.scaler.step(optimizer)  # skipped when unscale_ found a non-finite gradient
            return bad

    def _noise(self, step: int) -> torch.Tensor:
        """This rank's slice of the global batch's noise for `step` (see RankContext.step_noise_seed)."""
        global_batch = self.cfg.train.global_batch_size
        self.noise.manual_seed(self.ctx.step_noise_seed(self.cfg.train.seed, step))
        z = torch.randn(
            global_batch, self.cfg.model.nz, 1, 1, generator=self.noise, device=self.device, dtype=self.dtype
        )
        return z[self.ctx.batch_slice(global_batch)]

    def train_step(self, batch: torch.Tensor | np.ndarray, step: int) -> Mapping[str, Any]:
        """`batch`: uint8 NHWC, from batches() (on the device) or an array on the host."""
        pixels = torch.as_tensor(batch, device=self.device)
        real = feed.to_float(pixels, self.dtype, self.cfg.train.channels_last)
        z = self._noise(step)
        with self.autocast:
            fake = self.trainG(z)
            logits_real = self.trainD(real)
            logits_fake = self.trainD(fake.detach())
            loss_d = self.bce(logits_real, torch.ones_like(logits_real)) + self.bce(
                logits_fake, torch.zeros_like(logits_fake)
            )
        bad_d = self._step(self.optD, loss_d, self.netD.parameters())

        # G's phase needs gradients through D but not for D: no D gradients, no D all-reduce.
        self.netD.requires_grad_(False)
        try:
            with self.autocast, self.parallel.no_sync(self.trainD):
                logits_gen = self.trainD(fake)
                loss_g = self.bce(logits_gen, torch.ones_like(logits_gen))
            bad_g = self._step(self.optG, loss_g, self.netG.parameters())
        finally:
            self.netD.requires_grad_(True)
        self.scaler.update(None if self.fp16 else 1.0)
        if self.netG_ema is not None:
            self.netG_ema.update(self.netG, step)
        return {
            "loss/d": loss_d.detach().float(),
            "loss/g": loss_g.detach().float(),
            "d/real": torch.sigmoid(logits_real.detach().float()).mean(),
            "d/fake": torch.sigmoid(logits_fake.detach().float()).mean(),
            "nonfinite": bad_d + bad_g,
        }

    def to_host(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """One all-reduce and one device-to-host copy for all metrics: the mean over ranks."""
        names = list(metrics)
        values = torch.stack([torch.as_tensor(metrics[n], device=self.device).float() for n in names])
        values = self.parallel.mean_over_ranks(values)
        return dict(zip(names, values.cpu().tolist()))

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        return self.parallel.any_rank(flags)

    def synchronize_replicas(self) -> None:
        """Average BatchNorm statistics over ranks, then prove every replica identical."""
        averaged = (self.netG_ema.module,) if self.netG_ema is not None else ()  # its BatchNorm statistics too
        self.parallel.synchronize_buffers((self.netG, self.netD, *averaged))
        shared = {k: v for k, v in self._payload().items() if k != RNG_FILE}  # RNG is per rank
        mismatch = self.parallel.first_mismatch(list(_tensors(shared)))
        if mismatch is not None:
            raise ReplicaMismatchError(
                f"data-parallel replicas differ before a checkpoint: first differing tensor {mismatch}"
            )

    @property
    def sampling_net(self) -> nn.Module:
        """The generator that sample(), evaluation and export use: the EMA one when kept."""
        return self.netG_ema.module if self.netG_ema is not None else self.netG

    def sample(self, num: Optional[int] = None, seed: Optional[int] = None) -> np.ndarray:
        if num is None and seed is None:
            return self.generate(self.fixed_noise.detach().cpu().numpy().reshape(len(self.fixed_noise), -1))
        return self.generate(latent_noise(num or len(self.fixed_noise), self.cfg.model.nz, seed or 0))

    @contextmanager
    def standing_statistics(self) -> Iterator[None]:
        """The average with BatchNorm statistics re-estimated from fresh latents inside the
        block (model.g_ema_standing_statistics; nothing to do without it), in eval mode."""
        count = self.cfg.model.g_ema_standing_statistics
        if self.netG_ema is None or not count:
            yield
            return
        net = self.netG_ema.module
        was_training = net.training
        net.eval()
        latent = torch.from_numpy(latent_noise(count, self.cfg.model.nz, STANDING_SEED))
        try:
            with standing_statistics(net, latent.view(count, -1, 1, 1).to(self.device, self.dtype)):
                yield
        finally:
            net.train(was_training)

    @torch.no_grad()
    def generate(self, z: np.ndarray, batch_size: int = 256, averaged: bool = True) -> np.ndarray:
        net = self.sampling_net if averaged else self.netG
        was_training = net.training
        net.eval()  # running BatchNorm statistics: sampling must not change the state
        try:
            with self.standing_statistics() if averaged else contextlib.nullcontext():
                chunks = []
                for start in range(0, len(z), batch_size):
                    latent = torch.from_numpy(np.asarray(z[start : start + batch_size], dtype=np.float32))
                    latent = latent.view(len(latent), -1, 1, 1).to(self.device, self.dtype)
                    chunks.append(to_uint8_images(net(latent)))
        finally:
            net.train(was_training)
        return np.concatenate(chunks)

    # --- state ---------------------------------------------------------------------------

    def _payload(self) -> dict[str, dict[str, Any]]:
        ema = {GENERATOR_EMA_FILE: self.netG_ema.module.state_dict()} if self.netG_ema is not None else {}
        return {
            GENERATOR_FILE: self.netG.state_dict(),
            **ema,
            DISCRIMINATOR_FILE: self.netD.state_dict(),
            OPTIMIZERS_FILE: {
                "generator": self.optG.state_dict(),
                "discriminator": self.optD.state_dict(),
                "scaler": self.scaler.state_dict(),
            },
            RNG_FILE: {
                "torch_cpu": torch.get_rng_state(),
                **({"torch_cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
                "fixed_noise": self.fixed_noise,
            },
        }

    def save(self, directory: Path) -> None:
        payload = self._payload()
        for name, tensor in _tensors(payload):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"refusing to write a checkpoint: {name} holds NaN or infinite values")
        for filename, content in payload.items():
            torch.save(content, Path(directory) / filename)

    def load(self, directory: Path) -> None:
        directory = Path(directory)

        def read(filename: str) -> Any:
            return torch.load(directory / filename, map_location=self.device, weights_only=True)

        self.netG.load_state_dict(read(GENERATOR_FILE))
        if self.netG_ema is not None:
            self._load_average(directory)
        self.netD.load_state_dict(read(DISCRIMINATOR_FILE))
        optimizers = read(OPTIMIZERS_FILE)
        self.optG.load_state_dict(optimizers["generator"])
        self.optD.load_state_dict(optimizers["discriminator"])
        train = self.cfg.train
        for optimizer, lr in ((self.optG, train.lr), (self.optD, train.discriminator_lr)):
            _match_parameter_layout(optimizer)
            for group in optimizer.param_groups:  # the config's rates, not the saved ones: a resume may change them
                group.update(lr=lr, betas=(train.beta1, train.beta2))
        if self.fp16:  # otherwise the scale is always 1
            self.scaler.load_state_dict(optimizers["scaler"])
        rng = torch.load(directory / RNG_FILE, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch_cpu"])
        if self.device.type == "cuda" and "torch_cuda" in rng:
            torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.fixed_noise = rng["fixed_noise"].to(self.device)
        self._broadcast_state()

    def _broadcast_state(self) -> None:
        """Rank 0's networks and optimizer state on every rank, where the strategy does not
        already guarantee it (at the start, and after a checkpoint loads)."""
        averaged = (self.netG_ema.module,) if self.netG_ema is not None else ()
        self.parallel.broadcast_state((self.netG, self.netD, *averaged), (self.optG, self.optD))

    def _load_average(self, directory: Path) -> None:
        """The saved average, or G itself when the checkpoint kept none (EMA switched on later)."""
        path = directory / GENERATOR_EMA_FILE
        if path.is_file():
            self.netG_ema.module.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        else:
            self.netG_ema.module.load_state_dict(self.netG.state_dict())

    def _neutral_nets(self) -> dict[str, nn.Module]:
        averaged = {NEUTRAL_AVERAGE: self.netG_ema.module} if self.netG_ema is not None else {}
        return {"generator": self.netG, "discriminator": self.netD, **averaged}

    def export_weights(self) -> dict[str, np.ndarray]:
        arrays = weights.to_neutral(self._neutral_nets())
        arrays["fixed_noise"] = self.fixed_noise.detach().cpu().numpy().reshape(len(self.fixed_noise), -1)
        return arrays

    def import_weights(self, arrays: Mapping[str, np.ndarray]) -> None:
        nets = self._neutral_nets()
        if not holds_average(arrays):
            nets.pop(NEUTRAL_AVERAGE, None)
        weights.from_neutral(nets, arrays)
        if self.netG_ema is not None and NEUTRAL_AVERAGE not in nets:  # the source kept none: start from G
            self.netG_ema.module.load_state_dict(self.netG.state_dict())
        noise = torch.from_numpy(np.asarray(arrays["fixed_noise"]))
        self.fixed_noise = noise.view(*noise.shape, 1, 1).to(self.device, self.dtype)

    def fingerprint(self) -> dict[str, str]:
        digests = {}
        for name, tensor in _tensors(self._payload()):
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digests[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
        return digests

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "framework": f"torch {torch.__version__}",
            "device": str(self.device),
            "data_parallel": self.parallel.name if self.ctx.world_size > 1 else None,
            "precision": self.precision.describe(),
            "layout": _layout(self.cfg.train.channels_last, self.channels_last_weights),
            "compiled": self.compiled,
            "threads": torch.get_num_threads(),
        }
        if self.device_cache is not None:  # decided when the loop asked for batches
            info["data_feed"] = "resident in device memory" if self.device_cache else "prefetched by a thread"
        info |= {
            "parameters": {"generator": count_parameters(self.netG), "discriminator": count_parameters(self.netD)},
        }
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return info

    def close(self) -> None:
        self.trainG = self.trainD = None  # drop the DDP reducers before the process group goes
        self.parallel.close()


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments in their parameter's memory layout: a checkpoint written with the other
    layout (channels-last or contiguous weights: another setting, or another strategy) loads
    its moments with the strides they were saved with."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape:
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def _layout(activations: bool, weights: bool) -> str:
    if not activations:
        return "contiguous (NCHW)"
    return "channels_last" if weights else "channels_last activations, contiguous weights (the strategy's)"


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in nested dicts / lists, in a stable order."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key in tree:
            yield from _tensors(tree[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, item in enumerate(tree):
            yield from _tensors(item, f"{prefix}.{index}")
