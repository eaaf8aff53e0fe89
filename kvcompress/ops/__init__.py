"""Built-in backends, one folder per kind (``kvcompress/ops/<kind>/``);
``kvcompress.backends`` imports a kind's folder on its first look-up, which
registers its backends. Nothing is imported here: no central list to edit."""
