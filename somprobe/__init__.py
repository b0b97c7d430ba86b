"""somprobe: look inside trained vision networks with self-organizing maps on a torus."""
__version__ = "0.1.0"
