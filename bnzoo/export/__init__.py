"""Exported artifacts of a trained model, each taking raw uint8 images and preprocessing inside.

- `saved_model`: the serving SavedModel (`export_serving_model`, `serving_function`), written
  by `train.py` into every run folder; TensorFlow Serving, `tf.saved_model.load` and
  `keras.layers.TFSMLayer` read it.
- `tflite`: TFLite models for phones and microcontrollers, float32 and int8 (post-training
  quantization calibrated on training images), written from a run by::

      python -m bnzoo.export runs/<run>          # model.tflite and model_int8.tflite

`evaluate.py` scores every one of them with the same metrics.
"""

from bnzoo.export.saved_model import (
    INPUT_NAME,
    METADATA_PATH,
    SIGNATURE_NAME,
    export_serving_model,
    read_export_metadata,
    serving_function,
)

__all__ = [
    "INPUT_NAME",
    "METADATA_PATH",
    "SIGNATURE_NAME",
    "export_serving_model",
    "read_export_metadata",
    "serving_function",
]
