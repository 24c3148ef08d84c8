"""The image autoencoder of latent-space training: a diffusers ``AutoencoderKL`` (SD-VAE).

The SG paper trains on ImageNet-256 in the latent space of ``stabilityai/sd-vae-ft-ema``
(256x256x3 images -> 4x32x32 latents). Conventions, shared by the shard writer
(``sgexp.data.latents``), the data pipeline and every decoder:

- ``encode_moments(images)``: images in [-1, 1] -> the posterior's *unscaled* mean and
  std. Shards store these, so that training draws a fresh ``mean + std·ε`` per step
  (as MaskDiT and REPA do) instead of freezing one posterior sample per image.
- The model sees ``scale · (z − shift)`` (SD-VAE: scale 0.18215, no shift), which
  brings the latents to about unit variance.
- ``decode(latents)`` inverts that: ``vae.decode(latents / scale + shift).sample``,
  images in [-1, 1], which ``sgexp.eval.sampling.to_uint8`` maps to pixels exactly
  as it maps the outputs of a pixel-space model.

``diffusers`` is imported here only, inside functions: the rest of sgexp (training on
pixel datasets, evaluation, sweeps) works without it. Nothing here downloads unless
the source is a hub id that is not in the Hugging Face cache and huggingface.co answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from pathlib import Path

import torch

from sgexp.checks import check_positive_int, fail
from sgexp.data.latent_format import is_latent
from sgexp.weights import internet_reachable

log = logging.getLogger(__name__)

SD_VAE = "stabilityai/sd-vae-ft-ema"  # the SG paper's autoencoder
HUB = "https://huggingface.co"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _where_to_get(source: str) -> str:
    local = f"models/{source.split('/')[-1]}"
    return (
        f"download it where the internet is reachable (`hf download {source} --local-dir {local}`"
        f" or `huggingface-cli download {source} --local-dir {local}`), copy that directory here and pass its path"
    )


def _vae_directory(path: Path) -> Path:
    """The directory holding the AutoencoderKL's config.json: ``path`` itself, or a pipeline's ``vae/``."""
    for candidate in (path, path / "vae"):
        config = candidate / "config.json"
        if config.is_file():
            kind = json.loads(config.read_text()).get("_class_name", "AutoencoderKL")
            if kind != "AutoencoderKL":
                raise fail("vae", str(path), f"holds a diffusers {kind}, not an AutoencoderKL")
            return candidate
    raise fail(
        "vae",
        str(path),
        "must be a directory with a diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors),"
        " or a pipeline directory with a vae/ subfolder",
    )


def _load_autoencoder(source: str):
    """(AutoencoderKL in eval mode on the CPU, resolved source). Fails naming ``vae`` when it cannot."""
    from diffusers import AutoencoderKL  # here, not at the top: the rest of sgexp runs without diffusers

    # low_cpu_mem_usage=False: the default path wants `accelerate`, which the stack does not need
    path = Path(source).expanduser()
    if path.exists():
        directory = _vae_directory(path)
        return AutoencoderKL.from_pretrained(directory, low_cpu_mem_usage=False), str(directory.resolve())
    if not HUB_ID.match(source):
        raise fail(
            "vae",
            source,
            f"is neither an existing directory nor a Hugging Face hub id such as {SD_VAE!r}",
        )
    try:  # the Hugging Face cache first: no network needed
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            return AutoencoderKL.from_pretrained(source, local_files_only=True, low_cpu_mem_usage=False), source
    except OSError:
        pass
    if not internet_reachable(HUB):
        raise FileNotFoundError(
            f"vae={source!r}: no such directory, and as a hub id it is not in the Hugging Face cache and"
            " huggingface.co is unreachable (offline): " + _where_to_get(source)
        )
    log.info("downloading %s from the Hugging Face hub", source)
    return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False), source


def weights_identity(module: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of the float32 state dict: the same weights in any file format or copy."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentVAE:
    """An ``AutoencoderKL`` with the scale (and shift) the model's latents use.

    ``scale`` defaults to the VAE config's ``scaling_factor`` (0.18215 for SD-VAE) and
    ``shift`` to its ``shift_factor`` (None -> 0). ``dtype`` is the autoencoder's compute
    precision; inputs are cast to it and outputs come back as float32.
    ``decode_batch_size`` bounds decoder memory (256px SD-VAE: ~0.25 GB per image in float32).
    """

    def __init__(
        self,
        autoencoder,
        source: str,
        scale: float | None = None,
        shift: float | None = None,
        dtype: str = "float32",
        decode_batch_size: int = 32,
    ):
        config = autoencoder.config
        scale = float(config.scaling_factor) if scale is None else scale
        shift = float(config.shift_factor or 0.0) if shift is None else shift
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise fail("scale", scale, "must be a finite number > 0 (SD-VAE: 0.18215)")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
            raise fail("shift", shift, "must be a finite number (SD-VAE: 0)")
        if dtype not in DTYPES:
            raise fail("dtype", dtype, f"must be one of {sorted(DTYPES)}")
        check_positive_int("decode_batch_size", decode_batch_size)
        self.identity = weights_identity(autoencoder)  # before any cast: the file's weights
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        if dtype != "float32":  # (diffusers warns about casting a loaded model, even to float32)
            self.autoencoder.to(DTYPES[dtype])
        self.source, self.scale, self.shift, self.dtype = source, float(scale), float(shift), dtype
        self.decode_batch_size = decode_batch_size
        self.in_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)  # one 2x downsampling per extra block

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def to(self, device: str | torch.device) -> LatentVAE:
        self.autoencoder.to(device)
        return self

    def describe(self) -> dict:
        """What meta.json records about the autoencoder."""
        config = self.autoencoder.config
        return {
            "source": self.source,
            "identity": self.identity,
            "class": "diffusers.AutoencoderKL",
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "block_out_channels": list(config.block_out_channels),
            "scaling_factor": float(config.scaling_factor),
            "shift_factor": config.shift_factor,
        }

    def _check(self, name: str, x: torch.Tensor, channels: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or not x.is_floating_point():
            what = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            raise fail(name, what, f"must be a float tensor (B, {channels}, H, W)")

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> posterior (mean, std), each float32 (B, C, H/f, W/f), unscaled."""
        self._check("images", images, self.in_channels)
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise fail("images", f"shape {tuple(images.shape)}", f"H and W must be multiples of {self.downsample}")
        posterior = self.autoencoder.encode(images.to(self.device, DTYPES[self.dtype])).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (B, C, h, w) -> images float32 (B, 3, h·f, w·f) in [-1, 1], on the latents' device."""
        self._check("latents", latents, self.latent_channels)
        out = []
        for chunk in latents.split(self.decode_batch_size):
            z = (chunk.float() / self.scale + self.shift).to(self.device, DTYPES[self.dtype])  # unscale in float32
            out.append(self.autoencoder.decode(z).sample.float().clamp(-1, 1).to(latents.device))
        return torch.cat(out)

    __call__ = decode  # a ``decode`` callable for sgexp.eval.sampling


def load_vae(
    source: str,
    device: str | torch.device = "cpu",
    scale: float | None = None,
    shift: float | None = None,
    dtype: str = "float32",
    decode_batch_size: int = 32,
) -> LatentVAE:
    """A ``LatentVAE`` from a local directory (a diffusers AutoencoderKL, or a pipeline with ``vae/``)
    or a hub id (``stabilityai/sd-vae-ft-ema``: the Hugging Face cache, else a download where possible)."""
    if not isinstance(source, str) or not source:
        raise fail("vae", source, f"must be a directory or a hub id such as {SD_VAE!r}")
    autoencoder, resolved = _load_autoencoder(source)
    return LatentVAE(autoencoder, resolved, scale, shift, dtype, decode_batch_size).to(device)


def vae_for_dataset(
    meta: dict, source: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32"
) -> LatentVAE | None:
    """The decoder of a latent dataset (None for an image dataset), exactly as meta.json describes it.

    ``source`` overrides where the autoencoder is loaded from (the directory recorded at
    prepare time may not exist on this machine); its weights must be the recorded ones.
    The scale and shift are meta.json's, whatever the autoencoder's config says.
    """
    if not is_latent(meta):
        return None
    recorded = meta["vae"]
    vae = load_vae(source or recorded["source"], device, meta["latent"]["scale"], meta["latent"]["shift"], dtype)
    if vae.identity != recorded["identity"]:
        raise fail(
            "vae",
            source or recorded["source"],
            f"has weights {vae.identity}, but {meta['name']} was encoded with {recorded['identity']}"
            f" ({recorded['source']}); decoding with other weights would score the wrong images",
        )
    return vae
