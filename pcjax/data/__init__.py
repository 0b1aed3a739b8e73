"""Datasets and host input: dataset specs (`datasets`), the digits data, the index sampler,
prepared-data checks (`prepared`), record sources, TensorFlow preprocessing and the tf.data
pipelines yielding host NumPy batches (`input_pipeline`). Device placement is the trainer's."""
