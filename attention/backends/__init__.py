"""Built-in backends; `attention.registry` creates them by name, importing each on demand."""
