"""The web demo (genllava-serve): a batching worker over infer.Assistant and a Gradio page over it."""
