"""Snakemake adapter: augmented sample list (training part; test part too with TTA) of one task."""

from leukotype.smk import logged
from leukotype.stages import run_augment

with logged(snakemake):
    run_augment(
        snakemake.input.split,
        snakemake.params.augmentation,
        snakemake.output.samples,
        tta=snakemake.params.tta,
        preprocessing=snakemake.params.preprocessing,
    )
