"""The web UI (`rlhf-time webui`, the `webui` extra): app (the page), form (the Train tab's inputs from the config
models), control (training runs as child processes), runs (run folders and their state), chat (streamed replies),
tasks (eval / score / export through the CLI), i18n (English and Chinese labels), server (host checks, launch).
Only app needs gradio."""
