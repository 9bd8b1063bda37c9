"""The console commands: thin Hydra entry points (``ddpm-train``, ``ddpm-sample``, ``ddpm-evaluate``,
``ddpm-train-classifier``, ``ddpm-report``). Each composes its config, checks its own options and calls the library;
the library never imports this package, and no command imports another."""
