"""One module per command flow, each reading top to bottom: set-up -> loop -> save (or load -> measure)."""

