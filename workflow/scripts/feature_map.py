"""Snakemake adapter: t-SNE map of one backbone layer's test features."""

from leukotype.smk import logged
from leukotype.stages import run_feature_map

with logged(snakemake):
    backbone, layer = snakemake.wildcards.backbone, snakemake.wildcards.layer
    run_feature_map(
        snakemake.input.features,
        layer,
        dict(zip(snakemake.params.tasks, snakemake.input.samples)),
        snakemake.output.figure,
        snakemake.params.settings,
        seed=snakemake.params.seed,
        title=f"t-SNE of the test features: {backbone}, layer {layer} ({snakemake.params.dataset})",
        classes=snakemake.params.classes,
        threads=snakemake.threads,
    )
