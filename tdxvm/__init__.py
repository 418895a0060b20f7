"""tdxvm: run private foundation models in Intel TDX Trust Domains on untrusted hosts."""

__version__ = "0.1.0"
