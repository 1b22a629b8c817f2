"""Snakemake adapter: predict new images with a model bundle."""

from leukotype.predict import run_predict
from leukotype.smk import logged

with logged(snakemake):
    run_predict(
        snakemake.input.model,
        list(snakemake.input.images),
        snakemake.output.table,
        device=snakemake.config["features"]["device"],
        top_k=snakemake.params.top_k,
        torch_home=snakemake.config["torch_home"],
        threads=snakemake.threads,
    )
