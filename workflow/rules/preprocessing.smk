# Preprocessing variants' data (leukotype.preprocessing), computed once and shared: each
# per-image step's table (crop boxes: one per margin, whichever variants use it) and each
# variant's fitted states (stain reference: training images that are never test images; under
# k-fold one state per fold, `<variant>.<fold>`, from the fold's training images; or the
# variant's reference images from outside the study).
# The external sets' own tables are made in external.smk.


rule analyse_images:
    input:
        validated=rules.validate_images.output.table,
    output:
        table=paths.analysis_table(R),
    log:
        f"{R}/logs/analyse_images/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/analyse_images/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        step=lambda wildcards: ANALYSES[wildcards.key],
        # not read by the script: a new segmentation reruns the table
        segmentation=SEGMENTATION_VERSION,
    script:
        "../scripts/analyse_images.py"


rule fit_preprocessing:
    input:
        # the study's images (a reference source's may not repeat them), and what the fit
        # sees: training images and their splits, or the variant's reference images
        unpack(fit_preprocessing_inputs),
        validated=rules.validate_images.output.table,
    output:
        state=paths.prep_state(R),
    log:
        f"{R}/logs/fit_preprocessing/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/fit_preprocessing/{{variant}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        preprocessing=lambda wildcards: FITTED[wildcards.variant].to_dict(),
        seed=config["split"]["seed"],
    script:
        "../scripts/fit_preprocessing.py"
