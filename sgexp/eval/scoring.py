"""What a model's samples are scored with: ``load_scoring`` picks the feature extractor, its reference
statistics and (for latent datasets) the decoder, the same way for ``sgexp.evaluate``, the sweeps and
the training callback, and loads them before any sampling (a missing file fails now, not in an hour)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sgexp.checks import check_choice
from sgexp.data import read_meta
from sgexp.data.latent_format import image_dataset_dir
from sgexp.eval.classifier import CHECKPOINT
from sgexp.eval.features import ALIASES, EXTRACTORS, FeatureExtractor, build_extractor
from sgexp.eval.metrics import ReferenceStats
from sgexp.eval.reference_batch import load_reference_batch
from sgexp.eval.reference_cache import reference_stats
from sgexp.vae import LatentVAE, vae_for_dataset

log = logging.getLogger(__name__)

WITHOUT_CLASSIFIER = ("inception", "none")  # what ``auto`` means when the dataset has no trained classifier


@dataclass
class Scoring:
    """The extractor (None: sample grids and timings only), its reference statistics, what those are
    of ("<dataset>/<split>" or the reference batch file), and the decoder of a latent dataset."""

    extractor: FeatureExtractor | None
    reference: ReferenceStats | None
    reference_name: str
    decode: LatentVAE | None


def classifier_dataset(dataset_dir: str | Path) -> Path | None:
    """The dataset whose classifier scores ``dataset_dir``'s samples: the dataset itself, or for
    latents the image dataset they were encoded from (None if that is not on this machine)."""
    try:
        return image_dataset_dir(dataset_dir, read_meta(dataset_dir))
    except FileNotFoundError:
        return None


def choose_extractor(name: str, dataset_dir: str | Path, without_classifier: str = "inception") -> str:
    """The extractor ``name`` stands for: ``inception`` (clean-fid), ``inception_tf`` (ADM's evaluator,
    ``protocol=adm``), ``classifier`` (``mnist``: mnist5k's classifier) or ``none``.

    ``auto`` is the dataset's own classifier (domain FID) when it has been trained (for latents: the
    classifier of the image dataset, ``classifier_dataset``), and ``without_classifier`` otherwise:
    ``inception`` where a number is the point (``sgexp.evaluate``, sweeps), ``none`` in the training
    callback, which then draws grids only rather than need Inception weights on a training machine.
    """
    check_choice("without_classifier", without_classifier, WITHOUT_CLASSIFIER)
    check_choice("extractor", name, ("auto", "none", *EXTRACTORS, *ALIASES))
    if name != "auto":
        return name
    images = classifier_dataset(dataset_dir)
    return "classifier" if images is not None and (images / CHECKPOINT).is_file() else without_classifier


def load_scoring(
    extractor: str,
    dataset_dir: str | Path,
    reference_split: str,
    reference_batch: str | None = None,
    *,
    weights: str | None = None,
    vae: str | None = None,
    device: str | torch.device = "cpu",
    without_classifier: str = "inception",
) -> Scoring:
    """Everything that turns samples of the dataset at ``dataset_dir`` into metrics, loaded now.

    ``extractor`` is chosen by ``choose_extractor``; the reference is ``reference_batch`` (an ADM
    npz: ``inception_tf`` only) if given, else the cached statistics of ``reference_split``; ``weights``
    is the Inception file; ``vae`` where the latent dataset's autoencoder is, if not where meta.json says."""
    dataset_dir = Path(dataset_dir)
    name = choose_extractor(extractor, dataset_dir, without_classifier)
    decode = vae_for_dataset(read_meta(dataset_dir), vae, device)  # None unless the dataset holds latents
    if name == "none":
        log.info("no classifier for %s (python -m sgexp.data classifier %s): grids only", dataset_dir, dataset_dir.name)
        return Scoring(None, None, "", decode)
    features = build_extractor(name, dataset_dir, device=device, weights=weights)
    if reference_batch:
        reference = load_reference_batch(reference_batch, features, device=device)
        return Scoring(features, reference, str(reference_batch), decode)
    reference = reference_stats(features, dataset_dir, reference_split, device=device)
    return Scoring(features, reference, f"{dataset_dir.name}/{reference_split}", decode)
