"""The endpoint: SageMaker's PyTorch inference container calls model_fn, input_fn, predict_fn, output_fn.

The container loads this file from ``/opt/ml/model/code/`` (``SAGEMAKER_PROGRAM=inference.py``),
next to ``common.py`` and ``contract.py``, which it imports from its own folder.

Requests (``POST /invocations``):
  * ``Content-Type: image/jpeg``, ``image/png`` or ``application/x-image``: the body is one image
    (JPEG, PNG, WebP, BMP or GIF; grayscale, palette and transparent images are converted to RGB);
  * ``Content-Type: application/json``: ``{"image_base64": "<base64>"}`` for one image or
    ``{"instances": ["<base64>", {"image_base64": "<base64>"}, ...]}`` for up to 32 images,
    with optional ``"top_k": 3`` and ``"return_logits": true``.
  ``top_k`` and ``return_logits`` can also come from the query string of a local server
  (``?top_k=3&return_logits=true``) or SageMaker's CustomAttributes header
  (``X-Amzn-SageMaker-Custom-Attributes: top_k=3;return_logits=true``); the JSON body wins.
  URLs are never fetched: an endpoint that downloads what a caller names is a server-side
  request forgery hole, and it has no internet access anyway.

Response (``application/json``), one entry per image in request order::

    {"predictions": [{"top_k": [{"label": "001.Affenpinscher", "index": 0, "probability": 0.91}, ...],
                      "logits": [...]}]}        # "logits": all classes, only with return_logits

Refusals are JSON ``{"error": "<what was wrong and what to send>", "status": <code>}``:
415 unsupported Content-Type, 406 unsupported Accept, 400 empty, undecodable or malformed
input, 413 body above 6 MiB, more than 32 images, or too many pixels; 500 when the
model or the server fails (out of memory, a broken model): the caller gets
``{"error": "internal error while ...; see the endpoint's log", "status": 500}`` and
the traceback goes to the container log only.

Before any of these functions runs, the toolkit's ``Transformer.transform`` decodes an
``application/json`` or ``text/csv`` body as UTF-8, outside every function of this script:
a body that is not UTF-8 would get HTTP 500 with the traceback as its body. Imported inside
the container, this script wraps that method so that such a request (or a missing body) gets
the 400 JSON refusal instead; everything else goes to the toolkit unchanged.

Inside the container a refused request sets the response status on the request
context and flows through predict_fn and output_fn as a ``RequestError`` value,
so the caller gets the short JSON message. Raising would also set the status,
but the toolkit then appends the Python traceback to the body, which is why each
of the three request functions also turns an unexpected exception into a 500 refusal. Without a context
(older toolkits, direct calls) the functions raise ``RequestError``, which the
toolkit turns into the same status.

A local HTTP server calls one pure function instead of the four::

    handle(body: bytes, content_type: str | None, accept: str | None,
           query: Mapping[str, str | Sequence[str]] | None, model: Classifier) -> tuple[int, bytes, str]

which returns (HTTP status, response body, response Content-Type) and never raises;
``model`` is what ``model_fn(model_dir)`` returns.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

from common import (DEFAULT_IMAGE_SIZE, MAX_IMAGE_PIXELS, ImageRejected, eval_transform, image_from_bytes,  # noqa: E402
                    load_model_dir, model_description, resize_size)
from contract import MODEL_FILE  # noqa: E402
from serving_model import ServedNetwork, calibration_batch, requested_precision, served_network, stored_network  # noqa: E402

try:  # present only inside the SageMaker inference containers
    from sagemaker_inference import content_types as _toolkit_content_types
    from sagemaker_inference import transformer as _toolkit_transformer
    from sagemaker_inference import utils as _toolkit_utils
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ErrorBase
except ImportError:
    _ErrorBase = Exception
    _toolkit_transformer = None

log = logging.getLogger(__name__)

JSON = "application/json"
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's limit for a real-time request
MAX_INSTANCES = 32
MAX_REQUEST_PIXELS = 2 * MAX_IMAGE_PIXELS  # bounds the decoded memory of one request
DEFAULT_TOP_K = 5
CUSTOM_ATTRIBUTES_HEADER = "x-amzn-sagemaker-custom-attributes"
JSON_FIELDS = ("image_base64", "instances", "top_k", "return_logits")
OPTION_FIELDS = ("top_k", "return_logits")
URL_FIELDS = ("url", "image_url", "uri", "image_uri", "s3_uri", "href")
URL_PREFIXES = ("http://", "https://", "s3://", "ftp://", "file:")
# JPEGs are decoded straight to a reduced size (Pillow's draft mode: DCT scaling, 1/2 to 1/8)
# no smaller than twice the side the model's transform resizes to, so the transform's
# antialiased resize still does most of the shrinking (model inputs within about 0.5% of
# a full decode's); model_fn sets it.
_draft_side: int | None = None
DRAFT_FACTOR = 2
NO_URLS = ("this endpoint does not fetch URLs; send the image itself: its bytes with Content-Type image/jpeg, "
           'or JSON {"image_base64": "..."}')


class RequestError(_ErrorBase):
    """A refused request: the HTTP status and a message for the caller.

    Inside the container it is a ``sagemaker_inference`` toolkit error, so raising it
    sets the response status.
    """

    def __init__(self, status_code: int, message: str):
        Exception.__init__(self, status_code, message)
        self.status_code = status_code
        self.message = message
        self.phrase = message.replace("\r", " ").replace("\n", " ")

    def __str__(self) -> str:
        return f"{self.status_code}: {self.message}"


@dataclass
class Classifier:
    """What model_fn returns: the network and what is needed to feed it and name its outputs.

    ``served`` is what answers requests (see serving_model.py: the stored artifact, or fp32 or
    int8 built at start-up); ``network`` is the trained eager network when it was loaded (None
    when the stored artifact serves), and answers itself when ``served`` is None.
    """

    network: nn.Module | None
    classes: list[str]
    info: dict[str, Any]
    device: torch.device
    transform: transforms.Compose
    served: ServedNetwork | None = None

    @property
    def precision(self) -> str:
        return self.served.precision if self.served else "fp32"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of one batch, as one forward pass of the served network."""
        return self.network(batch) if self.served is None else self.served(batch)


@dataclass(frozen=True)
class Options:
    top_k: int | None = None
    return_logits: bool | None = None


@dataclass
class Request:
    images: list[Image.Image]
    top_k: int
    return_logits: bool


@dataclass
class Prediction:
    probabilities: torch.Tensor  # (images, classes), on the CPU
    logits: torch.Tensor
    classes: list[str]
    top_k: int
    return_logits: bool


# ---------------------------------------------------------------- the four container functions

def model_fn(model_dir: str) -> Classifier:
    """The serving network: the model archive's stored serving artifact when this torch can load it,
    else built from model.pth (one log line says why), as serving_model.py describes.

    Nothing is downloaded. The precision comes from ``DOGBREED_INFERENCE_PRECISION`` (the model
    package's environment; fp32 when unset). A corrupt artifact raises ``ArtifactRefused``: the
    endpoint does not start rather than serve it.
    """
    global _draft_side
    started = time.perf_counter()
    precision = requested_precision()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes, info = model_description(model_dir)
    image_size = int(info.get("image_size", DEFAULT_IMAGE_SIZE))
    transform = eval_transform(image_size)
    served, why = stored_network(model_dir, info, precision, device)
    network = None
    if served is None:
        log.warning("building the serving network from %s: %s", MODEL_FILE, why)
        network, classes, info = load_model_dir(model_dir, device)
        served = served_network(network, device, precision, calibration_batch(model_dir, transform), image_size)
    _draft_side = DRAFT_FACTOR * resize_size(image_size)
    log.info("loaded %s with %d classes on %s from %s; serving %s (%s%s) after %.1f s", info.get("backbone"), len(classes),
             device, model_dir, served.precision, served.runtime, ", stored artifact" if network is None else "",
             time.perf_counter() - started)
    return Classifier(network, classes, info, device, transform, served)


def input_fn(request_body: bytes | bytearray | str, request_content_type: str | None, context: Any = None) -> Request | RequestError:
    try:
        return parse_request(request_body, request_content_type, options_from_context(context))
    except RequestError as error:
        return refused(error, context)
    except Exception:
        return internal_error("reading the request", context)


def predict_fn(data: Request | RequestError, model: Classifier, context: Any = None) -> Prediction | RequestError:
    if isinstance(data, RequestError):
        return data
    try:
        return prediction_of(data, model)
    except Exception:
        return internal_error("predicting", context)


def output_fn(prediction: Prediction | RequestError, accept: str | None, context: Any = None) -> tuple[str, str]:
    if isinstance(prediction, RequestError):
        return error_json(prediction), JSON
    try:
        check_accept(accept)
        return json.dumps(response_document(prediction)), JSON
    except RequestError as error:
        return error_json(refused(error, context)), JSON
    except Exception:
        return error_json(internal_error("writing the response", context)), JSON


def handle(body: bytes, content_type: str | None, accept: str | None,
           query: Mapping[str, str | Sequence[str]] | None, model: Classifier) -> tuple[int, bytes, str]:
    """One request for a local HTTP server: (status, body, Content-Type); never raises."""
    try:
        options = options_from_query(query or {})
        check_accept(accept)
        prediction = predict_fn(parse_request(body, content_type, options), model)
        text, response_type = output_fn(prediction, accept)
        return 200, text.encode(), response_type
    except RequestError as error:
        log.info("refused a request: %s", error)
        return error.status_code, error_json(error).encode(), JSON
    except Exception:
        log.exception("prediction failed")
        return 500, error_json(RequestError(500, internal_error_message("predicting"))).encode(), JSON


# ---------------------------------------------------------------- before the toolkit decodes

def undecodable_body_error(body: Any, content_type: str | None) -> RequestError | None:
    """The refusal of a body the toolkit would fail to decode as UTF-8 (it does so for JSON and CSV)."""
    if body is None:
        return RequestError(400, f"the request body is empty; send an image or JSON (Content-Type {media_type(content_type)})")
    if not isinstance(body, (bytes, bytearray)):
        return None
    try:
        bytes(body).decode("utf-8")
    except UnicodeDecodeError as error:
        return RequestError(400, f"the body is not UTF-8 text, which Content-Type {content_type} must be "
                                 f"(byte {error.start} is 0x{body[error.start]:02x}); send UTF-8 JSON, or the image "
                                 "itself with Content-Type image/jpeg")
    return None


def refused_batch(data: Sequence[Mapping[str, Any]], context: Any) -> list[str] | None:
    """JSON refusals for a batch with a body the toolkit cannot decode, else None (the toolkit goes on)."""
    processors = getattr(context, "request_processor", None) or []
    errors = []
    for index, request in enumerate(data):
        properties = processors[min(index, len(processors) - 1)].get_request_properties() if processors else {}
        content_type = _toolkit_utils.retrieve_content_type_header(properties)
        errors.append(undecodable_body_error(request.get("body"), content_type)
                      if content_type in _toolkit_content_types.UTF8_TYPES else None)
    if not any(errors):
        return None
    answers = []
    for index, error in enumerate(errors):
        error = error or RequestError(400, "another request of this batch was refused; send it again on its own")
        log.info("refused a request before decoding: %s", error)
        context.set_response_status(code=error.status_code, phrase=error.phrase, idx=index)
        context.set_response_content_type(index, JSON)
        answers.append(error_json(error))
    return answers


def _guard_toolkit_decoding() -> None:
    """Wrap the toolkit's ``Transformer.transform`` once per process with ``refused_batch``."""
    if _toolkit_transformer is None or getattr(_toolkit_transformer.Transformer.transform, "refuses_undecodable", False):
        return
    toolkit_transform = _toolkit_transformer.Transformer.transform

    def transform(self: Any, data: Any, context: Any) -> Any:
        return refused_batch(data, context) or toolkit_transform(self, data, context)

    transform.refuses_undecodable = True
    transform.toolkit_transform = toolkit_transform
    _toolkit_transformer.Transformer.transform = transform


_guard_toolkit_decoding()


# ---------------------------------------------------------------- refusals

def refused(error: RequestError, context: Any) -> RequestError:
    """The error as a value once the context carries its status; raised when there is no context."""
    log.info("refused a request: %s", error)
    if context is None or not hasattr(context, "set_response_status"):
        raise error from None
    context.set_response_status(code=error.status_code, phrase=error.phrase)
    return error


def internal_error_message(stage: str) -> str:
    return f"internal error while {stage}; see the endpoint's log"


def internal_error(stage: str, context: Any) -> RequestError:
    """The 500 refusal for the exception being handled, whose traceback goes to the log only.

    Call it inside ``except``: the toolkit would otherwise put the traceback in the response body.
    """
    log.exception("request failed while %s", stage)
    return refused(RequestError(500, internal_error_message(stage)), context)


def error_json(error: RequestError) -> str:
    return json.dumps({"error": error.message, "status": error.status_code})


# ---------------------------------------------------------------- reading a request

def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_accept(accept: str | None) -> None:
    offered = [media_type(part) for part in (accept or "").split(",")]
    if not accept or any(kind in (JSON, "application/*", "*/*", "") for kind in offered):
        return
    raise RequestError(406, f"Accept {accept!r} cannot be served: responses are {JSON}")


def parse_request(body: bytes | bytearray | str | None, content_type: str | None, options: Options) -> Request:
    kind = media_type(content_type)
    if kind not in (*IMAGE_CONTENT_TYPES, JSON):
        shown = repr(content_type) if content_type else "missing"
        raise RequestError(415, f"Content-Type {shown} is not supported; send {', '.join(IMAGE_CONTENT_TYPES)} or {JSON}")
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
    if not data:
        raise RequestError(400, f"the request body is empty; send an image or JSON (Content-Type {kind})")
    if len(data) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is {len(data):,} bytes, above the limit of {MAX_BODY_BYTES:,}")
    if kind == JSON:
        return request_from_json(data, options)
    if data.lstrip()[:8].lower().startswith((b"http://", b"https://", b"s3://")):
        raise RequestError(400, NO_URLS)
    return Request(decoded_images([(data, "the request body")]), *resolved(options, Options()))


def request_from_json(data: bytes, options: Options) -> Request:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise RequestError(400, 'the JSON body must be an object: {"image_base64": "..."} or {"instances": [...]}')
    if any(field in document for field in URL_FIELDS):
        raise RequestError(400, NO_URLS)
    unknown = sorted(set(document) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)} in the JSON body; known: {', '.join(JSON_FIELDS)}")
    if ("image_base64" in document) == ("instances" in document):
        raise RequestError(400, 'give exactly one of "image_base64" (one image) or "instances" (a list of images)')
    if "image_base64" in document:
        encoded = [(base64_bytes(document["image_base64"], "image_base64"), "image_base64")]
    else:
        encoded = instances_bytes(document["instances"])
    in_body = Options(
        top_k=top_k_from(document["top_k"], "the JSON body") if "top_k" in document else None,
        return_logits=flag_from(document["return_logits"], "return_logits", "the JSON body") if "return_logits" in document else None,
    )
    return Request(decoded_images(encoded), *resolved(in_body, options))


def instances_bytes(instances: Any) -> list[tuple[bytes, str]]:
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, '"instances" must be a non-empty list of base64 strings or {"image_base64": "..."} objects')
    if len(instances) > MAX_INSTANCES:
        raise RequestError(413, f'"instances" holds {len(instances)} images, above the limit of {MAX_INSTANCES} per request')
    encoded = []
    for position, instance in enumerate(instances):
        where = f"instances[{position}]"
        if isinstance(instance, dict):
            if any(field in instance for field in URL_FIELDS):
                raise RequestError(400, f"{where}: {NO_URLS}")
            if set(instance) != {"image_base64"}:
                raise RequestError(400, f'{where} must be a base64 string or {{"image_base64": "..."}}, got fields {", ".join(sorted(instance)) or "none"}')
            instance, where = instance["image_base64"], f"{where}.image_base64"
        encoded.append((base64_bytes(instance, where), where))
    return encoded


def base64_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"{where} must be a base64 string, got {type(value).__name__}")
    if value.strip().lower().startswith(URL_PREFIXES):
        raise RequestError(400, f"{where}: {NO_URLS}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where} is not valid base64") from None
    if not data:
        raise RequestError(400, f"{where} is empty")
    return data


def header_pixels(data: bytes) -> int:
    """Pixels the image header announces, 0 when there is no readable header."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            return image.size[0] * image.size[1]
    except Exception:
        return 0


def decoded_images(encoded: list[tuple[bytes, str]]) -> list[Image.Image]:
    total = sum(header_pixels(data) for data, _ in encoded)
    if total > MAX_REQUEST_PIXELS:
        raise RequestError(413, f"the images hold {total:,} pixels together, above the limit of {MAX_REQUEST_PIXELS:,} "
                                "per request; send fewer or smaller images")
    images = []
    for data, where in encoded:
        try:
            images.append(image_from_bytes(data, max_pixels=MAX_IMAGE_PIXELS, formats=IMAGE_FORMATS, draft_side=_draft_side))
        except ImageRejected as error:
            raise RequestError(413 if error.too_large else 400, f"{where}: {error.reason}") from None
    return images


# ---------------------------------------------------------------- options

def top_k_from(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(400, f"top_k must be a whole number of 1 or more, got {value!r} (in {where})")
    return value


def flag_from(value: Any, name: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(400, f"{name} must be true or false, got {value!r} (in {where})")


def options_from_pairs(pairs: Mapping[str, str], where: str) -> Options:
    return Options(
        top_k=top_k_from(pairs["top_k"], where) if "top_k" in pairs else None,
        return_logits=flag_from(pairs["return_logits"], "return_logits", where) if "return_logits" in pairs else None,
    )


def options_from_query(query: Mapping[str, str | Sequence[str]]) -> Options:
    """Options from a query string already split into a mapping (``parse_qs`` lists are fine)."""
    pairs = {key: value if isinstance(value, str) else value[-1] for key, value in query.items() if value}
    unknown = sorted(set(query) - set(OPTION_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown query parameter(s) {', '.join(unknown)}; known: {', '.join(OPTION_FIELDS)}")
    return options_from_pairs(pairs, "the query string")


def options_from_context(context: Any) -> Options:
    """top_k/return_logits from the CustomAttributes header, e.g. ``top_k=3;return_logits=true``."""
    try:
        headers = context.request_processor[0].get_request_properties()
    except (AttributeError, IndexError, KeyError, TypeError):
        return Options()
    attributes = next((value for key, value in dict(headers).items() if str(key).lower() == CUSTOM_ATTRIBUTES_HEADER), None)
    if not attributes:
        return Options()
    if isinstance(attributes, (bytes, bytearray)):
        attributes = attributes.decode("utf-8", "replace")
    text = str(attributes).replace(";", "&").replace(",", "&")
    pairs = {key: values[-1] for key, values in parse_qs(text).items() if key in OPTION_FIELDS}
    return options_from_pairs(pairs, "CustomAttributes")


def resolved(first: Options, second: Options) -> tuple[int, bool]:
    """(top_k, return_logits): from ``first`` where given, else ``second``, else the defaults."""
    top_k = first.top_k if first.top_k is not None else second.top_k if second.top_k is not None else DEFAULT_TOP_K
    logits = first.return_logits if first.return_logits is not None else bool(second.return_logits)
    return top_k, logits


# ---------------------------------------------------------------- the response

def prediction_of(request: Request, model: Classifier) -> Prediction:
    """All the request's images in one forward pass."""
    batch = torch.stack([model.transform(image) for image in request.images]).to(model.device)
    with torch.inference_mode():
        logits = model.forward(batch).float()
        probabilities = torch.softmax(logits, dim=1)
    return Prediction(probabilities.cpu(), logits.cpu(), model.classes, request.top_k, request.return_logits)


def response_document(prediction: Prediction) -> dict[str, Any]:
    k = min(prediction.top_k, len(prediction.classes))
    best_probabilities, best_indices = prediction.probabilities.topk(k, dim=1)
    predictions = []
    for row, (probabilities, indices) in enumerate(zip(best_probabilities.tolist(), best_indices.tolist())):
        entry: dict[str, Any] = {"top_k": [
            {"label": prediction.classes[index], "index": index, "probability": probability}
            for probability, index in zip(probabilities, indices)
        ]}
        if prediction.return_logits:
            entry["logits"] = prediction.logits[row].tolist()
        predictions.append(entry)
    return {"predictions": predictions}
