"""A small classifier of the embedded digits: the feature space of digits-FID and the judge of
mode coverage.

Trained at first use, deterministically (fixed seeds, explicit generators, deterministic
kernels, one thread), on sklearn's 1,797 labelled digits rendered exactly as the `digits`
source renders them, at 32x32 grayscale. Any training resolution and channel count is mapped
to that before classification.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

SIZE = 32
NUM_CLASSES = 10
FEATURES = 128
SEED = 20261127
EPOCHS = 15
# The recipe's version: change it with the architecture, data or training, so caches retrain.
WEIGHTS_FILE = "digits-classifier-v1.safetensors"


class DigitsClassifier(nn.Module):
    """Two conv blocks and two linear layers; `features` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.hidden = nn.Linear(32 * (SIZE // 4) ** 2, FEATURES)
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC of any size and channel count -> float (N, 1, 32, 32) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().mean(dim=1, keepdim=True)
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
    return x / 127.5 - 1.0


def labelled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the `digits` source renders them at 32 px grayscale, with labels."""
    from sklearn.datasets import load_digits

    from pipeline.config import DataSection
    from pipeline.data.sources import iterate

    images = np.stack([image for _, image in iterate(DataSection(source="digits", image_size=SIZE, channels=1))])
    return images, load_digits().target.astype(np.int64)


def _shifted(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Each image moved by a random whole-pixel offset, so generated digits that sit slightly
    off-centre are still recognized."""
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=generator)
    return torch.stack([p[:, dy : dy + SIZE, dx : dx + SIZE] for p, (dy, dx) in zip(padded, offsets.tolist())])


def train(images: np.ndarray, labels: np.ndarray, epochs: int = EPOCHS) -> tuple[DigitsClassifier, float]:
    """The classifier and its accuracy on the unshifted training images. Bit-identical on
    every call on the same machine."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # a fixed summation order, whatever the machine's cores
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = DigitsClassifier()
        generator = torch.Generator().manual_seed(SEED)
        x, y = to_input(images), torch.from_numpy(labels)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for batch in order.split(64):
                loss = F.cross_entropy(model(_shifted(x[batch], generator)), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x).argmax(1) == y).float().mean())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model, accuracy


def load_or_train() -> Path:
    """This node's cached classifier (DCGAN_CACHE_DIR, else ~/.cache/dcgan), trained and
    written there on first use (about 20 s on one core)."""
    from safetensors.torch import save_file

    from pipeline.durable import node_lock
    from pipeline.storage import cache_root

    path = cache_root() / "eval" / WEIGHTS_FILE
    with node_lock(path.with_name(path.name + ".lock")):
        if not path.is_file():
            model, accuracy = train(*labelled_digits())
            log.info("trained the digits classifier for evaluation (accuracy %.4f on the real digits); cached at %s",
                     accuracy, path)  # fmt: skip
            staging = path.with_name(path.name + ".tmp")
            save_file(model.state_dict(), str(staging), metadata={"accuracy": json.dumps(accuracy), "seed": str(SEED)})
            staging.replace(path)
    return path


def reference_weights(prepared_address: str, local_prepared: Path) -> Path:
    """The classifier stored beside the prepared set (`<prepared>/eval/`), so every node and
    every later evaluation scores with the same network, whatever its own training would give.
    The first evaluation of a prepared set puts this node's there; a URI's copy is fetched."""
    from pipeline import storage
    from pipeline.durable import node_lock

    name = f"eval/{WEIGHTS_FILE}"
    local = local_prepared / name
    with node_lock(local_prepared / ".eval-classifier.lock"):
        if local.is_file():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.with_name(local.name + ".tmp")
        if not storage.is_uri(prepared_address):
            staging.write_bytes(load_or_train().read_bytes())
        else:
            remote = storage.location(prepared_address)
            if not remote.exists(name):
                remote.upload_file(load_or_train(), name)
            remote.download_file(name, staging)  # whichever node's copy got there first
        staging.replace(local)
    return local


def load(path: Path) -> DigitsClassifier:
    from safetensors.torch import load_file

    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
