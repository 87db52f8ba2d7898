"""The plain core every other package builds on: the domain's frozen dataclasses, the error
family, the ports that adapters implement, and the prompt format. It imports no third-party
library and nothing from the rest of doppelbot but the settings' option types, so any layer
may depend on it."""
