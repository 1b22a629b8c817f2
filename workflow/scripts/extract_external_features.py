"""Snakemake adapter: features of an external set's images (their own folder)."""

from leukotype.smk import logged
from leukotype.stages_external import run_extract_external

with logged(snakemake):
    run_extract_external(
        snakemake.input.validated,
        snakemake.wildcards.backbone,
        snakemake.params.layers,
        snakemake.params.weights,
        snakemake.params.sha256,
        snakemake.config["torch_home"],
        # speed settings from the config, not params: changing them never re-extracts
        {**snakemake.config["features"], "precision": snakemake.params.precision},
        snakemake.output[0],
        adapt=snakemake.wildcards.adapt,
        threads=snakemake.threads,
        preprocessing=snakemake.params.preprocessing,
        preprocessing_files=snakemake.input.preprocessing,
    )
