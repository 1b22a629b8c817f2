"""Snakemake adapter: stage ImageNet weights into $TORCH_HOME (run where there is internet)."""

from leukotype.smk import logged
from leukotype.weights import downloadable, stage_weights

with logged(snakemake):
    for backbone in snakemake.params.backbones:
        if downloadable(backbone):
            print(f"staged {backbone}: {stage_weights(backbone, snakemake.params.torch_home)}")
