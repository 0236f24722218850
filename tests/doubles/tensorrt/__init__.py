"""TEST DOUBLE of the `tensorrt` package: only a version string, so engine stamps have one to record.

NOT TensorRT. Lives in trtconv's tests/doubles/ and is put on sys.path by tests only.
Version overridable with TRTCONV_DOUBLE_TENSORRT_VERSION.
"""

import os

TRTCONV_TEST_DOUBLE = True
__version__ = os.environ.get("TRTCONV_DOUBLE_TENSORRT_VERSION", "10.13.3.9")
