"""Snakemake adapter: stage downloadable weights into the torch_home (run where there is internet)."""

from leukotype.config import staged_weights
from leukotype.smk import logged
from leukotype.weights import stage

with logged(snakemake):
    for backbone, weights in staged_weights(snakemake.config):
        print(f"staged {backbone} ({weights}): {stage(backbone, weights, snakemake.params.torch_home)}")
