# leukotype: CNN feature extraction / fine-tuning comparison for acute-leukemia cell images.
# The Snakefile only sets up, includes the rule files and names the final targets.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/preprocessing.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/external.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/models.smk"


rule all:
    default_target: True
    input:
        final_targets(),
