"""Snakemake adapter: a preprocessing variant's fitted states (stain reference) from training
images, or from the variant's reference images outside the study."""

from leukotype.smk import logged
from leukotype.stages import run_fit_preprocessing

with logged(snakemake):
    run_fit_preprocessing(
        snakemake.input.validated,
        snakemake.input.get("splits", []),
        snakemake.params.preprocessing,
        snakemake.input.get("analyses", []),
        snakemake.params.seed,
        snakemake.output.state,
        reference=snakemake.input.get("reference") or None,
        # not a param: a change of the validation settings reruns validate_images, whose table
        # is an input, so a param would only rerun every existing study's fit (and extraction)
        validation=snakemake.config["validation"],
    )
