# Weight staging. Run on a machine with internet (a login node); compute jobs only read.


localrules:
    fetch_weights,


rule fetch_weights:
    output:
        staged_weight_files(),
    log:
        f"{R}/logs/fetch_weights.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        torch_home=TORCH_HOME,
    script:
        "../scripts/fetch_weights.py"
