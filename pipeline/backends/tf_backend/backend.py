"""The TensorFlow implementation of the Backend protocol.

One device: the default strategy; one worker with several devices: MirroredStrategy; several
workers (TF_CONFIG names them, as Ray's TensorflowTrainer does): MultiWorkerMirroredStrategy.
Every variable, optimizer slots included, is created inside `strategy.scope()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import keras
import numpy as np

from pipeline.backends.base import (
    NEUTRAL_AVERAGE, STANDING_SEED, NonFiniteError, ReplicaMismatchError, holds_average, latent_noise, warmed_up_decay,
)
from pipeline.backends.tf_backend import tf, weights
from pipeline.backends.tf_backend.models import build_discriminator, build_generator, count_parameters
from pipeline.backends.tf_backend.devices import describe, make_strategy, resolve_precision, use_devices
from pipeline.backends.tf_backend.standing import standing_statistics
from pipeline.config import Config, ConfigError
from pipeline.context import RankContext
from pipeline.data.sharding import EpochSharder
from pipeline.data.shards import ShardedImages

log = logging.getLogger(__name__)

# Keras dtype policies: bf16 / fp16 compute with float32 variables (and float32 outputs, models.py).
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}

STATE_PREFIX = "tf_state"  # tf.train.Checkpoint writes tf_state.index + tf_state.data-*


def _adam(cfg: Config, lr: float, fp16: bool) -> keras.optimizers.Optimizer:
    adam = keras.optimizers.Adam(lr, cfg.train.beta1, cfg.train.beta2, epsilon=1e-8)  # torch's eps
    if fp16:  # a dynamic loss scale, as torch's GradScaler keeps
        return keras.optimizers.LossScaleOptimizer(adam, initial_scale=2.0**16, dynamic_growth_steps=2000)
    # Otherwise an initial scale of 1 (exact) and no growth: the wrapper is here for its
    # distributed, device-side skip of an update whose gradients are not finite.
    return keras.optimizers.LossScaleOptimizer(adam, initial_scale=1.0, dynamic_growth_steps=2**30)


class TFBackend:
    framework = "tensorflow"

    def __init__(self, cfg: Config, ctx: RankContext, strategy: Optional[tf.distribute.Strategy] = None):
        self.cfg, self.ctx = cfg, ctx
        if cfg.runtime.deterministic:
            # Process-wide, with no public switch back. Under op determinism an unseeded random
            # op is an error: the global seed gives every one (Keras internals included) a seed.
            tf.random.set_seed(ctx.process_seed(cfg.train.seed) % 2**31)
            tf.config.experimental.enable_op_determinism()
        if strategy is None:
            # Under Ray, a worker that Ray gave no GPU trains on the CPU (ctx.device == "cpu").
            use_devices(ctx.device or cfg.runtime.device)
            strategy = make_strategy(ctx.world_size)
        self.strategy = strategy
        log.info("TensorFlow: %s", describe(self.strategy))
        replicas = self.strategy.num_replicas_in_sync
        if cfg.train.global_batch_size % replicas:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
                f"{replicas} replicas of {type(self.strategy).__name__}"
            )
        # Under MultiWorkerMirroredStrategy a save is collective: every worker writes.
        self.save_is_collective = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        model, data, seed = cfg.model, cfg.data, ctx.init_seed(cfg.train.seed) % 2**31
        self.precision = resolve_precision(cfg.train.precision)
        self.fp16 = self.precision.name == "fp16"
        policy = _POLICIES[self.precision.name]
        with self.strategy.scope():
            sync = model.sync_batchnorm  # statistics over all replicas of the global batch
            self.netG = build_generator(model.nz, model.ngf, data.channels, data.image_size, seed, sync, policy)
            self.netD = build_discriminator(model.ndf, data.channels, data.image_size, seed + 1000, sync, policy)
            # G's exponential moving average (model.g_ema_decay), BatchNorm statistics included.
            self.netG_ema = None
            if model.g_ema_decay:
                self.netG_ema = build_generator(model.nz, model.ngf, data.channels, data.image_size, seed, sync, policy)
                self.netG_ema.set_weights(self.netG.get_weights())
            self.optG, self.optD = _adam(cfg, cfg.train.lr, self.fp16), _adam(cfg, cfg.train.discriminator_lr, self.fp16)
            self.optG.build(self.netG.trainable_variables)  # slots inside the scope (docs/ARCHITECTURE.md, traps)
            self.optD.build(self.netD.trainable_variables)
            fixed = np.random.default_rng(ctx.fixed_noise_seed(cfg.train.seed)).standard_normal(
                (cfg.logging.num_samples, model.nz)
            )
            self.fixed_noise = tf.Variable(fixed.astype(np.float32), trainable=False, name="fixed_noise")
        tracked = dict(
            generator=self.netG, discriminator=self.netD, optimizer_g=self.optG, optimizer_d=self.optD,
            fixed_noise=self.fixed_noise,
        )  # fmt: skip
        self.state = tf.train.Checkpoint(**tracked, **({"generator_ema": self.netG_ema} if self.netG_ema else {}))
        self.state_without_average = tf.train.Checkpoint(**tracked)  # reads checkpoints that kept none
        # XLA with the default strategy only: it compiles neither MirroredStrategy's per-device
        # copies nor MultiWorkerMirrored's collectives.
        self.jit_compile = cfg.train.compile and self.strategy is tf.distribute.get_strategy()
        if cfg.train.compile and not self.jit_compile:
            log.warning("train.compile: XLA is not used under %s; the step runs as a graph", type(self.strategy).__name__)
        self._step = tf.function(self._distributed_step, jit_compile=self.jit_compile)

    # --- data ----------------------------------------------------------------------------

    def batches(self, images: ShardedImages, sharder: EpochSharder) -> Iterator[Any]:
        """This worker's slice of each global batch, split over its replicas by tf.data."""
        per_worker = sharder.local_batch_size
        replicas_here = self.strategy.num_replicas_in_sync // self.ctx.world_size
        per_replica = per_worker // replicas_here
        shape = images.shape

        def per_replica_batches():
            for indices in sharder:
                worker_batch = images.gather(indices)
                for replica in range(replicas_here):  # the strategy hands them out in this order
                    yield worker_batch[replica * per_replica : (replica + 1) * per_replica]

        def dataset_fn(_input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            signature = tf.TensorSpec((per_replica, *shape), tf.uint8)
            return tf.data.Dataset.from_generator(per_replica_batches, output_signature=signature).prefetch(2)

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        return iter(self.strategy.distribute_datasets_from_function(dataset_fn, options))

    # --- training ------------------------------------------------------------------------

    def _replica_step(self, images_u8: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        global_batch = self.cfg.train.global_batch_size
        real = tf.cast(images_u8, tf.float32) / 127.5 - 1.0  # uint8 crossed to the device; float here
        local = tf.shape(real)[0]
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        # The whole global batch's noise from (seed, step); this replica takes its rows (as in torch).
        z = tf.random.stateless_normal((global_batch, self.cfg.model.nz), seed)[replica * local : (replica + 1) * local]

        def average(labels_like: tf.Tensor, logits: tf.Tensor, label: float) -> tf.Tensor:
            per_example = tf.nn.sigmoid_cross_entropy_with_logits(tf.fill(tf.shape(labels_like), label), logits)
            return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)

        with tf.GradientTape() as tape_g:
            fake = self.netG(z, training=True)
            with tf.GradientTape() as tape_d:
                logits_real = self.netD(real, training=True)
                logits_fake = self.netD(tf.stop_gradient(fake), training=True)
                loss_d = average(logits_real, logits_real, 1.0) + average(logits_fake, logits_fake, 0.0)
                scaled_d = self.optD.scale_loss(loss_d)  # recorded by the tape: times 1 unless fp16
            bad_d = self._apply(self.optD, tape_d.gradient(scaled_d, self.netD.trainable_variables), self.netD, loss_d)
            logits_gen = self.netD(fake, training=True)  # after D's update, as in the torch backend
            loss_g = average(logits_gen, logits_gen, 1.0)
            scaled_g = self.optG.scale_loss(loss_g)
        bad_g = self._apply(self.optG, tape_g.gradient(scaled_g, self.netG.trainable_variables), self.netG, loss_g)
        replicas = tf.cast(self.strategy.num_replicas_in_sync, tf.float32)
        return {
            # Each replica's loss is its share of the global mean: the sum over replicas is the mean.
            "loss/d": loss_d,
            "loss/g": loss_g,
            "d/real": tf.reduce_mean(tf.sigmoid(logits_real)) / replicas,
            "d/fake": tf.reduce_mean(tf.sigmoid(logits_fake)) / replicas,
            "nonfinite": bad_d + bad_g,
        }

    def _apply(self, optimizer, grads, net: keras.Model, loss: tf.Tensor) -> tf.Tensor:
        """Apply unless a gradient or the loss is not finite (the optimizer skips on the device).

        Under fp16 an overflowing (scaled) gradient is routine: the optimizer skips that update
        and lowers its scale; only a non-finite loss counts as a failure, as in torch."""
        checked = [tf.math.is_finite(loss)]
        if not self.fp16:
            checked += [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return 1.0 - tf.cast(tf.reduce_all(checked), tf.float32)

    def _distributed_step(self, images: Any, seed: tf.Tensor, decay: tf.Tensor) -> dict[str, tf.Tensor]:
        per_replica = self.strategy.run(self._replica_step, args=(images, seed))
        if self.netG_ema is not None:  # in cross-replica context: every copy gets the same value
            for average, value in zip(self.netG_ema.weights, self.netG.weights):
                average.assign(decay * average + (1.0 - decay) * value)
        return {name: self.strategy.reduce("SUM", value, axis=None) for name, value in per_replica.items()}

    def train_step(self, batch: Any, step: int) -> Mapping[str, Any]:
        seed = tf.constant([self.ctx.step_noise_seed(self.cfg.train.seed, step) % 2**31, 0], tf.int32)
        decay = warmed_up_decay(self.cfg.model.g_ema_decay, step)
        return self._step(batch, seed, tf.constant(decay, tf.float32))

    def to_host(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Already reduced over every replica of every worker inside the step."""
        return {name: float(np.asarray(value)) for name, value in metrics.items()}

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """Across workers under MultiWorkerMirroredStrategy; one process decides alone otherwise."""
        if not self.save_is_collective:
            return [bool(flag) for flag in flags]
        votes = self.strategy.run(lambda: tf.constant([1 if flag else 0 for flag in flags], tf.int32))
        return [int(count) > 0 for count in self.strategy.reduce("SUM", votes, axis=None).numpy()]

    def synchronize_replicas(self) -> None:
        """Average BatchNorm statistics over replicas, then check that every replica holds what
        replica 0 holds, variable by variable; two collectives in all, whatever the model's size.

        Keras updates moving statistics on each replica's own copy (mirrored variables without
        aggregation), as the torch backend keeps them per rank; the mean over all replicas of
        all workers is written back to every copy. The check all-gathers a fingerprint of each
        replica's copy of each variable (its bits summed plainly and weighted by position, in
        int64) rather than the copies themselves: one variable per collective cost about 0.1 s
        each under MultiWorkerMirroredStrategy (measured: 17 s of a 4-step run on 2 CPU workers)."""
        if self.strategy.num_replicas_in_sync == 1:
            return

        averaged = self.netG_ema.non_trainable_weights if self.netG_ema is not None else []
        statistics = self.netG.non_trainable_weights + self.netD.non_trainable_weights + averaged
        if statistics:
            means = self.strategy.run(
                lambda: tf.distribute.get_replica_context().all_reduce("MEAN", [_local_copy(v) for v in statistics])
            )  # fmt: skip
            for variable, mean in zip(statistics, self.strategy.experimental_local_results(means)[0]):
                variable.assign(mean)

        named = self._variables()

        def differing() -> tf.Tensor:  # per variable: 1 where this replica's copy is not replica 0's
            local = tf.stack([_fingerprint(_local_copy(variable)) for _, variable in named])
            gathered = tf.distribute.get_replica_context().all_gather(local[None], axis=0)
            return tf.cast(tf.reduce_any(gathered != gathered[:1], axis=(0, 2)), tf.int32)

        flags = self.strategy.reduce("SUM", self.strategy.run(differing), axis=None).numpy()
        if flags.any():
            raise ReplicaMismatchError(
                f"data-parallel replicas differ before a checkpoint: first differing tensor {named[int(flags.argmax())][0]}"
            )

    @property
    def sampling_net(self) -> keras.Model:
        """The generator that sample(), evaluation and export use: the EMA one when kept."""
        return self.netG_ema if self.netG_ema is not None else self.netG

    def sample(self, num: Optional[int] = None, seed: Optional[int] = None) -> np.ndarray:
        if num is None and seed is None:
            return self.generate(self.fixed_noise.numpy())
        return self.generate(latent_noise(num or len(self.fixed_noise.numpy()), self.cfg.model.nz, seed or 0))

    @contextmanager
    def standing_statistics(self) -> Iterator[None]:
        """The average with BatchNorm statistics re-estimated from fresh latents inside the
        block (model.g_ema_standing_statistics; nothing to do without it)."""
        count = self.cfg.model.g_ema_standing_statistics
        if self.netG_ema is None or not count:
            yield
            return
        with standing_statistics(self.netG_ema, latent_noise(count, self.cfg.model.nz, STANDING_SEED)):
            yield

    def generate(self, z: np.ndarray, batch_size: int = 256, averaged: bool = True) -> np.ndarray:
        net = self.sampling_net if averaged else self.netG
        chunks = []
        with self.standing_statistics() if averaged else contextlib.nullcontext():
            for start in range(0, len(z), batch_size):
                images = net(np.asarray(z[start : start + batch_size], dtype=np.float32), training=False)
                chunks.append(np.round((np.clip(images.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8))
        return np.concatenate(chunks)

    # --- state ---------------------------------------------------------------------------

    def _variables(self) -> list[tuple[str, Any]]:
        named = [(f"generator/{v.path}", v) for v in self.netG.weights]
        named += [(f"generator_ema/{i}", v) for i, v in enumerate(self.netG_ema.weights if self.netG_ema else [])]
        named += [(f"discriminator/{v.path}", v) for v in self.netD.weights]
        # Optimizer variable paths carry per-instance counters (adam_1, adam_3): index them.
        named += [(f"optimizer_g/{i}", v) for i, v in enumerate(self.optG.variables)]
        named += [(f"optimizer_d/{i}", v) for i, v in enumerate(self.optD.variables)]
        return named + [("fixed_noise", self.fixed_noise)]

    def save(self, directory: Path) -> None:
        for name, variable in self._variables():
            value = np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise NonFiniteError(f"refusing to write a checkpoint: {name} holds NaN or infinite values")
        self.state.write(str(Path(directory) / STATE_PREFIX))

    def load(self, directory: Path) -> None:
        prefix = str(Path(directory) / STATE_PREFIX)
        saved_average = any(name.startswith("generator_ema/") for name, _ in tf.train.list_variables(prefix))
        if self.netG_ema is None or saved_average:
            self.state.read(prefix).assert_existing_objects_matched().expect_partial()
        else:  # a checkpoint without an average (EMA switched on later): the average starts from G
            self.state_without_average.read(prefix).assert_existing_objects_matched().expect_partial()
            self.netG_ema.set_weights(self.netG.get_weights())
        # The config's rates, not the saved ones: a resume may change them.
        for optimizer, lr in ((self.optG, self.cfg.train.lr), (self.optD, self.cfg.train.discriminator_lr)):
            optimizer.learning_rate.assign(lr)

    def export_weights(self) -> dict[str, np.ndarray]:
        averaged = weights.to_neutral(self.netG_ema, NEUTRAL_AVERAGE) if self.netG_ema is not None else {}
        return {
            **weights.to_neutral(self.netG), **weights.to_neutral(self.netD), **averaged,
            "fixed_noise": self.fixed_noise.numpy(),
        }  # fmt: skip

    def import_weights(self, arrays: Mapping[str, np.ndarray]) -> None:
        weights.from_neutral(self.netG, arrays)
        weights.from_neutral(self.netD, arrays)
        if self.netG_ema is not None:  # the source's average, or (it kept none) G itself
            if holds_average(arrays):
                weights.from_neutral(self.netG_ema, arrays, NEUTRAL_AVERAGE)
            else:
                self.netG_ema.set_weights(self.netG.get_weights())
        self.fixed_noise.assign(np.asarray(arrays["fixed_noise"], dtype=np.float32))

    def fingerprint(self) -> dict[str, str]:
        return {
            name: hashlib.sha256(np.ascontiguousarray(np.asarray(v.numpy())).tobytes()).hexdigest()
            for name, v in self._variables()
        }

    def describe(self) -> dict[str, Any]:
        devices = describe(self.strategy)
        kind = "gpu" if devices["gpus"] else "cpu"
        return {
            "framework": f"tensorflow {tf.__version__}",
            "device": f"{kind}, {devices['strategy']}, {devices['replicas']} replica(s)",
            "devices": devices["devices"],
            "precision": self.precision.describe(),
            "compiled": self.jit_compile,
            **({"device_name": ", ".join(devices["gpus"])} if devices["gpus"] else {}),
            "parameters": {"generator": count_parameters(self.netG), "discriminator": count_parameters(self.netD)},
        }

    def close(self) -> None:
        pass


def _local_copy(variable) -> tf.Tensor:
    """Inside strategy.run: this replica's own copy of a variable (or the tensor itself)."""
    return tf.identity(variable.value if isinstance(variable, keras.Variable) else variable)


def _fingerprint(value: tf.Tensor) -> tf.Tensor:
    """Two int64 sums over a tensor's bits, plain and weighted by position (wrapping on
    overflow, exact and independent of summation order): one changed element changes the
    first, two swapped ones the second. Several changes could cancel out; drift does not aim to."""
    flat = tf.reshape(value, [-1])
    if flat.dtype.is_floating:
        flat = tf.bitcast(flat, {2: tf.int16, 4: tf.int32, 8: tf.int64}[flat.dtype.size])
    flat = tf.cast(flat, tf.int64)
    position = tf.range(1, tf.size(flat, out_type=tf.int64) + 1)
    return tf.stack([tf.reduce_sum(flat), tf.reduce_sum(flat * position)])
