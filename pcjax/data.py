"""The input-side names of pcjax in one namespace, for notebooks, experiments and benchmarks.

The code lives in modules split by concern: `pcjax.datasets` (metadata, no TensorFlow),
`pcjax.preprocessing` (TF image ops), `pcjax.toy_data` (the scikit-learn digits sets) and
`pcjax.input_pipeline` (samplers, iterators, evaluation padding, device prefetch).
"""

from pcjax.datasets import (  # noqa: F401
    DATASETS,
    DIGITS_CANVAS_DIGIT_SIZE,
    DIGITS_CANVAS_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetSpec,
    image_shape,
    num_classes,
    num_eval_batches,
    per_process_batch_size,
    process_example_counts,
)
from pcjax.input_pipeline import (  # noqa: F401
    create_eval_dataset,
    create_train_dataset,
    num_train_examples,
)
from pcjax.preprocessing import (  # noqa: F401
    cifar_eval_preprocess,
    cifar_train_preprocess,
    imagenet_eval_preprocess,
    imagenet_train_preprocess,
    normalize,
    pad_and_random_crop,
    random_resized_crop_window,
)
from pcjax.toy_data import (  # noqa: F401
    canvas_offsets,
    digits_background_value,
    load_digits_canvas_split,
    load_digits_split,
)
