"""leukotype: reproducible CNN comparison for acute-leukemia cell images."""

__version__ = "0.1.0"
