"""Built-in kpr plugins, one package each; each registers in the `kpr.plugins` entry-point group."""
