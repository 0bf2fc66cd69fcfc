"""The data layer: dataset registry, k-shot split files, image decoding, augmentation and the test loader.

Import from the submodules (`from clip_qlora.data.splits import load_split`): this package re-exports nothing,
so that checking params (`data.registry`) and the prepare stage (`data.splits`) never load `data.images`,
which imports torch and torchvision.
"""
