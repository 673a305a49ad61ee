"""TransferSAM: a fully automatic kidney / tumor / cyst cascade on a frozen SAM encoder.

Seed: G. Nozadze, "Kidney and Kidney Tumor Segmentation via Transfer Learning" (KiTS23) and its
public code (github.com/Noza23/TransferSAM). Only the mask decoders train, on image embeddings
computed once per slice and cached on disk:

1. ``cache.embed_dataset``: embed the foreground slices of every case plus as many random blank
   slices into ``CACHE/`` (resumable).
2. ``decoders.train_decoder``: train the ``roi`` (kidney + masses, fixed large box), ``tumor``
   and ``cyst`` (kidney-region boxes) decoders into one cascade folder.
3. ``cascade.load_cascade`` + ``Cascade.predict_volume`` / ``cascade.predict_path``: per slice
   ROI -> kidney boxes -> tumor and cyst logits -> argmax -> KiTS labels 0/1/2/3 on the input's
   exact grid.

Importing this package needs no torch; the submodules ``encoder``, ``cache`` (when embedding),
``decoders`` and ``cascade`` do.
"""

from slidesam.transfersam.config import (
    DECODERS,
    BoxConfig,
    CascadeConfig,
    DecoderTrainConfig,
    EmbedConfig,
    EncoderRef,
    load_train_config,
)

__all__ = [
    "DECODERS",
    "BoxConfig",
    "CascadeConfig",
    "DecoderTrainConfig",
    "EmbedConfig",
    "EncoderRef",
    "load_train_config",
]
