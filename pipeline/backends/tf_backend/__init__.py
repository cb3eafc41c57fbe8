"""The TensorFlow / Keras backend. Importing it imports TensorFlow, quietly."""

from pipeline.backends.tf_backend.quiet import import_tensorflow

tf = import_tensorflow()
