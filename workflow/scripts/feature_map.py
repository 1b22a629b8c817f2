"""Snakemake adapter: t-SNE map of one backbone layer's test features (external sets marked)."""

from leukotype.smk import logged
from leukotype.stages import run_feature_map

with logged(snakemake):
    backbone, layer = snakemake.wildcards.backbone, snakemake.wildcards.layer
    externals = [
        {"config": entry, "validated": validated, "features": features}
        for entry, validated, features in zip(
            snakemake.params.externals,
            snakemake.input.external_validated,
            snakemake.input.external_features,
        )
    ]
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
        externals=externals,
        tasks_cfg=snakemake.params.tasks,
    )
