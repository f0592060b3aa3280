// Python face of the batcher. The hot path (submit, drain) uses the CPython API directly:
// rows go from the decoded request (a buffer, or a list of numbers from JSON) straight
// into the pooled request buffer, with no intermediate numpy or torch object.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>

#include "batcher/batch_hooks.h"
#include "batcher/batcher.h"
#include "batcher/oip_json.h"
#include "batcher/py_batcher.h"
#include "common/datatypes.h"
#include "featcache/featcache.h"
#include "sketch/sketch.h"

namespace py = pybind11;

namespace vivace {
namespace {

// The datatype table is generated from vivace/datatypes.py (common/datatypes.h).
const DTypeInfo& LookupDType(const std::string& name) {
  const DTypeInfo* d = FindDType(name.c_str());
  if (d == nullptr || !d->batchable) throw std::invalid_argument("unsupported datatype for batching: " + name);
  return *d;
}

int64_t RowElements(const std::vector<int64_t>& row_shape) {
  int64_t elements = 1;
  for (int64_t dim : row_shape) {
    if (dim < 0) throw std::invalid_argument("only the batch dimension may be variable (-1)");
    elements *= dim;
  }
  return elements;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mant = x & 0x7fffffu;
  const int exp = static_cast<int>((x >> 23) & 0xffu);
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
  const int e = exp - 127 + 15;
  if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow: infinity
  if (e <= 0) {                                                  // subnormal or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    const uint32_t m = mant | 0x800000u;
    const int shift = 14 - e;
    uint32_t half = m >> shift;
    if ((m >> (shift - 1)) & 1u) half += 1;  // round half up
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  if (mant & 0x1000u) half += 1;  // round to nearest; carries into the exponent correctly
  return static_cast<uint16_t>(half);
}

// bfloat16 is the top half of a float32: round to nearest even, keep NaN a (quiet) NaN.
uint16_t FloatToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);  // overflow rounds to infinity, as it should
  return static_cast<uint16_t>(x >> 16);
}

// Writes JSON numbers (possibly nested lists) into `out` as `dtype`.
// Elements in a (nested) list, counted without converting them.
int64_t CountElements(PyObject* list) {
  int64_t n = 0;
  const Py_ssize_t size = PyList_GET_SIZE(list);
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    n += PyList_Check(item) ? CountElements(item) : 1;
  }
  return n;
}

class ListWriter {
 public:
  ListWriter(const DTypeInfo& dtype, uint8_t* out, int64_t capacity, const std::string& name)
      : dtype_(dtype), out_(out), capacity_(capacity), name_(name) {}

  void Write(PyObject* list) {
    const Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(list, i);
      if (PyList_Check(item)) {
        Write(item);
        continue;
      }
      if (count_ >= capacity_) Fail("has more elements than its shape holds");
      Store(item);
      ++count_;
    }
  }
  int64_t count() const { return count_; }

 private:
  [[noreturn]] void Fail(const std::string& what) const {
    throw py::value_error("input '" + name_ + "' " + what);
  }

  double AsDouble(PyObject* item) const {
    if (PyFloat_Check(item)) return PyFloat_AS_DOUBLE(item);
    if (PyLong_Check(item)) {
      const double v = PyLong_AsDouble(item);
      if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        Fail("has an integer too large for its datatype");
      }
      return v;
    }
    Fail(std::string("has a non-numeric element for datatype ") + dtype_.name);
  }

  template <typename T>
  void StoreInt(PyObject* item) {
    if (!PyLong_Check(item) || PyBool_Check(item))
      Fail(std::string("needs integers for datatype ") + dtype_.name);
    int overflow = 0;
    T value;
    if constexpr (std::is_signed<T>::value) {
      const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
      if (overflow || v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())
        Fail(std::string("has a value out of range for ") + dtype_.name);
      value = static_cast<T>(v);
    } else {
      const unsigned long long v = PyLong_AsUnsignedLongLong(item);
      if (PyErr_Occurred()) {
        PyErr_Clear();
        Fail(std::string("has a value out of range for ") + dtype_.name);
      }
      if (v > std::numeric_limits<T>::max()) Fail(std::string("has a value out of range for ") + dtype_.name);
      value = static_cast<T>(v);
    }
    std::memcpy(out_ + count_ * static_cast<int64_t>(sizeof(T)), &value, sizeof(T));
  }

  void Store(PyObject* item) {
    switch (dtype_.type) {
      case DType::kBool: {
        if (!PyBool_Check(item)) Fail("needs true/false for datatype BOOL");
        out_[count_] = item == Py_True ? 1 : 0;
        return;
      }
      case DType::kUint8: return StoreInt<uint8_t>(item);
      case DType::kUint16: return StoreInt<uint16_t>(item);
      case DType::kUint32: return StoreInt<uint32_t>(item);
      case DType::kUint64: return StoreInt<uint64_t>(item);
      case DType::kInt8: return StoreInt<int8_t>(item);
      case DType::kInt16: return StoreInt<int16_t>(item);
      case DType::kInt32: return StoreInt<int32_t>(item);
      case DType::kInt64: return StoreInt<int64_t>(item);
      case DType::kFp16: {
        const uint16_t h = FloatToHalf(static_cast<float>(AsDouble(item)));
        std::memcpy(out_ + count_ * 2, &h, 2);
        return;
      }
      case DType::kBf16: {
        const uint16_t b = FloatToBf16(static_cast<float>(AsDouble(item)));
        std::memcpy(out_ + count_ * 2, &b, 2);
        return;
      }
      case DType::kFp32: {
        const float f = static_cast<float>(AsDouble(item));
        std::memcpy(out_ + count_ * 4, &f, 4);
        return;
      }
      case DType::kFp64: {
        const double d = AsDouble(item);
        std::memcpy(out_ + count_ * 8, &d, 8);
        return;
      }
      case DType::kBytes: break;  // not batchable: LookupDType refuses it
    }
    Fail(std::string("has datatype ") + dtype_.name + ", which the batcher cannot hold");
  }

  const DTypeInfo& dtype_;
  uint8_t* out_;
  int64_t capacity_;
  int64_t count_ = 0;
  const std::string& name_;
};

// Keeps one Python thread state per executor thread, so each batch takes the GIL
// without creating and destroying a thread state.
class ExecutorThreadState {
 public:
  void Acquire() {
    if (!initialised_) {
      outer_ = PyGILState_Ensure();
      initialised_ = true;
      return;  // holds the GIL now
    }
    inner_ = PyGILState_Ensure();
  }
  void Release() {
    if (first_release_) {
      first_release_ = false;
      saved_ = PyEval_SaveThread();  // keep the thread state, drop the GIL
      return;
    }
    PyGILState_Release(inner_);
  }
  ~ExecutorThreadState() {
    if (initialised_ && !first_release_ && !_Py_IsFinalizing()) {
      PyEval_RestoreThread(saved_);
      PyGILState_Release(outer_);
    }
  }

 private:
  bool initialised_ = false, first_release_ = true;
  PyGILState_STATE outer_{}, inner_{};
  PyThreadState* saved_ = nullptr;
};

thread_local ExecutorThreadState executor_thread_state;

class PyBatcher {
 public:
  PyBatcher(const std::string& model_name, int64_t max_batch_size,
            std::vector<int64_t> preferred_batch_sizes, int64_t max_queue_delay_us,
            int priority_levels, int default_priority, int64_t default_timeout_us,
            bool allow_timeout_override, int64_t max_queue_size, int64_t shed_queue_wait_us,
            std::vector<std::pair<std::string, std::vector<int64_t>>> inputs,
            std::vector<std::pair<std::string, std::vector<int64_t>>> outputs, int executors,
            bool inline_execution, py::object execute)
      : execute_(std::move(execute)) {
    BatcherConfig c;
    c.model_name = model_name;
    c.max_batch_size = max_batch_size;
    c.preferred_batch_sizes = std::move(preferred_batch_sizes);
    c.max_queue_delay_us = max_queue_delay_us;
    c.priority_levels = priority_levels;
    c.default_priority = default_priority;
    c.default_timeout_us = default_timeout_us;
    c.allow_timeout_override = allow_timeout_override;
    c.max_queue_size = max_queue_size;
    c.shed_queue_wait_us = shed_queue_wait_us;
    c.executors = executors;
    c.inline_execution = inline_execution;
    for (const auto& [dtype, row_shape] : inputs) {
      const DTypeInfo& d = LookupDType(dtype);
      const int64_t elems = RowElements(row_shape);
      input_dtypes_.push_back(&d);
      input_row_elems_.push_back(elems);
      c.input_row_bytes.push_back(elems * d.size);
    }
    for (const auto& [dtype, row_shape] : outputs) {
      const DTypeInfo& d = LookupDType(dtype);
      c.output_row_bytes.push_back(RowElements(row_shape) * d.size);
    }
    PyObject* fn = execute_.ptr();
    ExecuteFn run;
    if (inline_execution) {
      // RunReady is called from Python, so this thread already holds the GIL.
      run = [this, fn](int executor, int64_t rows) {
        if (!RunNative(executor, rows)) CallExecute(fn, executor, rows);
      };
    } else {
      run = [this, fn](int executor, int64_t rows) {
        if (RunNative(executor, rows)) return;  // native kernels never need the GIL
        executor_thread_state.Acquire();
        try {
          CallExecute(fn, executor, rows);
        } catch (...) {
          executor_thread_state.Release();
          throw;
        }
        executor_thread_state.Release();
      };
    }
    batcher_ = std::make_shared<Batcher>(std::move(c), std::move(run));
  }

  // A native kernel (C entry point from a capsule) runs batches directly: from the first
  // input buffer to the first output buffer, float32 rows, no Python and no GIL.
  void SetNativeForward(py::capsule model, py::capsule forward, py::object owner) {
    const auto& c = batcher_->config();
    if (input_dtypes_.size() != 1 || input_dtypes_[0]->type != DType::kFp32 || c.output_row_bytes.size() != 1)
      throw py::value_error("a native forward needs one FP32 input and one FP32 output");
    native_owner_ = std::move(owner);  // keeps the model alive as long as the batcher
    native_ = {model.get_pointer(), reinterpret_cast<NativeForward::Fn>(forward.get_pointer())};
  }

  bool RunNative(int executor, int64_t rows) {
    if (!native_) return false;
    native_.Run(*batcher_, executor, rows);
    return true;
  }

  // Calls execute(executor, rows) with the GIL held; a Python exception becomes a
  // std::runtime_error carrying its message, which fails the batch's requests.
  static void CallExecute(PyObject* fn, int executor, int64_t rows) {
    PyObject* result = PyObject_CallFunction(fn, "iL", executor, static_cast<long long>(rows));
    if (result != nullptr) {
      Py_DECREF(result);
      return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject* text = value ? PyObject_Str(value) : nullptr;
    const char* utf8 = text ? PyUnicode_AsUTF8(text) : nullptr;
    std::string error = utf8 && *utf8 ? utf8 : (type ? reinterpret_cast<PyTypeObject*>(type)->tp_name : "error");
    if (PyErr_Occurred()) PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    throw std::runtime_error(error);
  }

  ~PyBatcher() {
    py::gil_scoped_release nogil;
    // The HTTP front end may hold the batcher a while longer (its routes): stop it now,
    // while the execute callable it calls is still alive.
    batcher_->Shutdown(false);
    batcher_.reset();
  }

  std::shared_ptr<Batcher> Native() const {
    if (!native_ || !batcher_->config().inline_execution)
      throw py::value_error("only an inline batcher running a native kernel can be driven natively");
    return batcher_;
  }

  JsonEndpoint Endpoint() const {
    if (!json_) throw py::value_error("the native JSON path is off for this batcher");
    return {batcher_, json_, json_row_elems_};
  }

  // Returns a Status code; 0 means queued. Raises ValueError for malformed tensors.
  int Submit(uint64_t token, py::list inputs, int64_t rows, int priority, int64_t timeout_us, bool traced) {
    const size_t n_inputs = input_dtypes_.size();
    if (static_cast<size_t>(PyList_GET_SIZE(inputs.ptr())) != n_inputs)
      throw py::value_error("expected " + std::to_string(n_inputs) + " inputs");
    if (rows < 1) throw py::value_error("a request needs at least one row");
    // The data must match the shape before any memory is sized from the shape: a small
    // request claiming billions of rows must not allocate them.
    for (size_t i = 0; i < n_inputs; ++i) {
      PyObject* obj = PyList_GET_ITEM(inputs.ptr(), static_cast<Py_ssize_t>(i));
      const int64_t row_elems = input_row_elems_[i];
      int64_t elems;
      if (PyList_Check(obj)) {
        elems = CountElements(obj);
      } else {
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) != 0) {
          PyErr_Clear();
          throw py::type_error("input data must be a list of numbers or a contiguous buffer");
        }
        elems = view.len / input_dtypes_[i]->size;
        const bool whole = view.len % input_dtypes_[i]->size == 0;
        PyBuffer_Release(&view);
        if (!whole)
          throw py::value_error("input #" + std::to_string(i) + " has " + std::to_string(view.len) +
                                " bytes, not a whole number of " + std::to_string(input_dtypes_[i]->size) +
                                "-byte elements");
      }
      if (row_elems > 0 && (rows > elems / row_elems || elems != rows * row_elems))
        throw py::value_error("input #" + std::to_string(i) + " has " + std::to_string(elems) +
                              " elements, its shape needs " + std::to_string(rows) + " x " +
                              std::to_string(row_elems));
    }
    Request* r = batcher_->Acquire(rows);
    try {
      for (size_t i = 0; i < n_inputs; ++i) {
        PyObject* obj = PyList_GET_ITEM(inputs.ptr(), static_cast<Py_ssize_t>(i));
        uint8_t* dst = r->input.data() + batcher_->input_offset(i, rows);
        const int64_t elems = input_row_elems_[i] * rows;
        const DTypeInfo& d = *input_dtypes_[i];
        if (PyList_Check(obj)) {
          const std::string label = "#" + std::to_string(i);
          ListWriter w(d, dst, elems, label);
          w.Write(obj);
          if (w.count() != elems)
            throw py::value_error("input #" + std::to_string(i) + " has " + std::to_string(w.count()) +
                                  " elements, its shape needs " + std::to_string(elems));
        } else {
          Py_buffer view;
          if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) != 0) {
            PyErr_Clear();
            throw py::type_error("input data must be a list of numbers or a contiguous buffer");
          }
          const int64_t want = elems * d.size;
          const bool ok = view.len == want;
          if (ok) std::memcpy(dst, view.buf, static_cast<size_t>(want));
          const Py_ssize_t got = view.len;
          PyBuffer_Release(&view);
          if (!ok)
            throw py::value_error("input #" + std::to_string(i) + " has " + std::to_string(got) +
                                  " bytes, its shape needs " + std::to_string(want));
        }
      }
    } catch (...) {
      batcher_->Release(r);
      throw;
    }
    r->traced = traced;
    const Status s = batcher_->Enqueue(r, token, priority, timeout_us);
    if (s != Status::kOk) batcher_->Release(r);
    return static_cast<int>(s);
  }

  // Counts every batch's input rows and output rows (first output) into drift sketches,
  // natively and without the GIL. The inputs sketched are the model's: the first input,
  // or, when serving by entity id, the features looked up for the batch (attach the
  // lookup first). Both must be FP32.
  void AttachSketches(py::object input_sketch, py::object output_sketch) {
    const bool by_entity = !feature_rows_.empty();
    if (!by_entity && (input_dtypes_.empty() || input_dtypes_[0]->type != DType::kFp32))
      throw py::value_error("drift sketches need an FP32 first input");
    std::shared_ptr<DriftSketch> in, out;
    if (!input_sketch.is_none()) in = input_sketch.cast<std::shared_ptr<DriftSketch>>();
    if (!output_sketch.is_none()) out = output_sketch.cast<std::shared_ptr<DriftSketch>>();
    AttachDriftSketches(*batcher_, std::move(in), std::move(out), feature_rows_,
                        by_entity ? feature_width_ : input_row_elems_[0]);
  }

  // Serving by entity id: before each batch, the INT64 keys of the first input are looked
  // up natively into `features[executor]` (float32 [max_batch, F], the model's input) and
  // the found flags written into the last output (BOOL [max_batch, 1]).
  void AttachFeatureLookup(py::object lookup, py::list features) {
    if (input_dtypes_.size() != 1 || input_dtypes_[0]->type != DType::kInt64 || input_row_elems_[0] != 1)
      throw py::value_error("serving by entity id needs one INT64 input of shape [-1, 1]");
    const int64_t max_batch = batcher_->config().max_batch_size;
    std::vector<float*> buffers;
    int64_t width = 0;
    for (py::handle item : features) {
      py::buffer_info info = py::cast<py::buffer>(item).request(true);
      if (info.itemsize != 4 || info.ndim != 2 || info.shape[0] < max_batch ||
          info.strides[1] != 4 || info.strides[0] != 4 * info.shape[1])
        throw py::value_error("feature buffers must be C-contiguous float32 [max_batch_size, F] arrays");
      width = info.shape[1];
      buffers.push_back(static_cast<float*>(info.ptr));
    }
    vivace::AttachFeatureLookup(*batcher_, lookup.cast<std::shared_ptr<featcache::FeatureLookup>>(), buffers);
    feature_buffers_ = features;  // keeps the arrays alive as long as the hook
    feature_rows_ = std::move(buffers);
    feature_width_ = width;
  }

  // Turns on the native JSON path; false when a datatype has none (the general path then
  // serves every request).
  bool EnableJson(const std::string& model_name, const std::string& model_version,
                  const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& inputs,
                  const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& outputs) {
    auto convert = [](const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& specs) {
      std::vector<JsonTensor> out;
      for (const auto& [name, datatype, row_shape] : specs)
        out.push_back({name, datatype, JsonTypeFromName(datatype), row_shape, RowElements(row_shape)});
      return out;
    };
    auto codec = std::make_shared<OipJsonCodec>(model_name, model_version, convert(inputs), convert(outputs));
    if (codec->usable()) json_ = std::move(codec);
    json_row_elems_ = 0;
    for (int64_t elems : input_row_elems_) json_row_elems_ += elems;
    return json_ != nullptr;
  }

  // Fast path for a JSON infer body: returns a Status code (0: queued), or kDeclined
  // when the request must go through the general decoder instead.
  static constexpr int kDeclined = 100;
  int SubmitJson(uint64_t token, py::buffer body, int priority, int64_t timeout_us, bool traced) {
    if (!json_) return kDeclined;
    // A request the queue would refuse is refused before its body is decoded (see Admission).
    const Status admission = batcher_->Admission();
    if (admission != Status::kOk) return static_cast<int>(admission);
    Py_buffer view;
    if (PyObject_GetBuffer(body.ptr(), &view, PyBUF_SIMPLE) != 0) {
      PyErr_Clear();
      return kDeclined;
    }
    const char* data = static_cast<const char*>(view.buf);
    std::vector<std::pair<const char*, const char*>> spans;
    std::string id;
    bool has_id = false;
    const int64_t rows = json_->Parse(data, static_cast<size_t>(view.len), &spans, &id, &has_id);
    int result = kDeclined;
    // Every element takes at least one byte of the body: a shape claiming more rows than
    // that is declined before its memory is sized (the general decoder explains why).
    if (rows > 0 && rows <= view.len / std::max<int64_t>(json_row_elems_, 1)) {
      Request* r = batcher_->Acquire(rows);
      if (json_->Fill(spans, rows, r->input.data())) {
        r->json_response = true;
        r->has_id = has_id;
        r->id = std::move(id);
        r->traced = traced;
        const Status s = batcher_->Enqueue(r, token, priority, timeout_us);
        if (s != Status::kOk) batcher_->Release(r);
        result = static_cast<int>(s);
      } else {
        batcher_->Release(r);
      }
    }
    PyBuffer_Release(&view);
    return result;
  }

  // [(token, status, payload)]: payload is every output's bytes, back to back (or, for
  // a fast-path JSON request, the response body), or the error text.
  py::list Drain() {
    std::vector<Request*> done = batcher_->Drain();
    py::list out(done.size());
    for (size_t k = 0; k < done.size(); ++k) {
      Request* r = done[k];
      const Status s = r->status.load();
      PyObject* payload;
      if (s != Status::kOk) {
        payload = PyUnicode_FromString(r->error.empty() ? StatusName(s) : r->error.c_str());
      } else if (r->json_response) {
        const std::string body = json_->Format(r->output.data(), r->rows, r->id, r->has_id);
        payload = PyBytes_FromStringAndSize(body.data(), static_cast<Py_ssize_t>(body.size()));
      } else {
        payload = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(r->output.data()),
                                            static_cast<Py_ssize_t>(r->output.size()));
      }
      PyObject* tuple = PyTuple_New(3);
      PyTuple_SET_ITEM(tuple, 0, PyLong_FromUnsignedLongLong(r->token));
      PyTuple_SET_ITEM(tuple, 1, PyLong_FromLong(static_cast<long>(s)));
      PyTuple_SET_ITEM(tuple, 2, payload);
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(k), tuple);
      if (r->traced) {
        const auto ns = [](Clock::time_point t) {
          return static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
        };
        const bool ran = r->batch_start != Clock::time_point{};
        traces_.append(py::make_tuple(r->token, ns(r->enqueue_time), ran ? ns(r->batch_start) : 0,
                                      ran && r->features_done != Clock::time_point{} ? ns(r->features_done) : 0, ran ? ns(r->batch_end) : 0, r->batch_rows));
      }
      batcher_->Release(r);
    }
    return out;
  }

  // [(token, enqueued, batch start, features looked up, batch end, batch rows)] of the
  // traced requests drained since the last call: steady clock (CLOCK_MONOTONIC) ns, 0 for
  // a request that never ran.
  py::list TakeTraces() {
    py::list out;
    std::swap(out, traces_);
    return out;
  }

  bool Cancel(uint64_t token) { return batcher_->Cancel(token); }
  int64_t RunReady(int64_t slice_us) { return batcher_->RunReady(slice_us); }
  void ExpireDue() { batcher_->ExpireDue(); }
  int fileno() const { return batcher_->notify_fd(); }
  int ready_fileno() const { return batcher_->ready_fd(); }

  void Shutdown(bool drain) {
    if (batcher_->config().inline_execution) {
      // A drain runs the queued batches on this thread, through the Python execute:
      // keep the GIL (there are no executor threads to join).
      batcher_->Shutdown(drain);
      return;
    }
    py::gil_scoped_release nogil;
    batcher_->Shutdown(drain);
  }

  py::list Buffers(int executor, bool inputs) {
    const auto& c = batcher_->config();
    if (executor < 0 || executor >= c.executors) throw py::index_error("no such executor");
    const auto& sizes = inputs ? c.input_row_bytes : c.output_row_bytes;
    py::list out;
    for (size_t i = 0; i < sizes.size(); ++i) {
      uint8_t* p = inputs ? batcher_->input_buffer(executor, i) : batcher_->output_buffer(executor, i);
      out.append(py::memoryview::from_memory(p, static_cast<py::ssize_t>(sizes[i] * c.max_batch_size), false));
    }
    return out;
  }

  py::dict Stats() const {
    const auto& s = batcher_->stats();
    py::dict d;
    d["success"] = s.success.load();
    py::dict failures;
    for (int k = 1; k < static_cast<int>(s.failures.size()); ++k)
      failures[StatusName(static_cast<Status>(k))] = s.failures[static_cast<size_t>(k)].load();
    d["failures"] = failures;
    d["inference_count"] = s.inference_count.load();
    d["execution_count"] = s.execution_count.load();
    d["queue_ns"] = s.queue_ns.load();
    d["compute_input_ns"] = s.compute_input_ns.load();
    d["compute_infer_ns"] = s.compute_infer_ns.load();
    d["compute_output_ns"] = s.compute_output_ns.load();
    d["queued_requests"] = batcher_->queued_requests();
    d["queued_rows"] = batcher_->queued_rows();
    auto hist = [](const Histogram& h) {
      return py::make_tuple(h.bounds(), h.Counts(), h.Sum());
    };
    py::dict h;
    h["request_seconds"] = hist(s.request_seconds);
    h["queue_seconds"] = hist(s.queue_seconds);
    h["compute_seconds"] = hist(s.compute_seconds);
    h["batch_size"] = hist(s.batch_size);
    d["histograms"] = h;
    return d;
  }

  int64_t queued_requests() const { return batcher_->queued_requests(); }

 private:
  py::object execute_;
  std::shared_ptr<const OipJsonCodec> json_;
  py::object feature_buffers_;
  int64_t json_row_elems_ = 0;  // elements per row over all inputs
  std::vector<float*> feature_rows_;  // per executor: the looked-up features of its batch
  int64_t feature_width_ = 0;
  py::object native_owner_;
  NativeForward native_;
  std::vector<const DTypeInfo*> input_dtypes_;
  std::vector<int64_t> input_row_elems_;
  std::shared_ptr<Batcher> batcher_;
  py::list traces_;  // traced requests drained, for TakeTraces
};

}  // namespace

JsonEndpoint JsonEndpointOf(py::handle batcher) { return py::cast<const PyBatcher&>(batcher).Endpoint(); }

std::shared_ptr<Batcher> NativeBatcherOf(py::handle batcher) { return py::cast<const PyBatcher&>(batcher).Native(); }

void BindBatcher(py::module_& m) {
  m.attr("INLINE_SLICE_US") = Batcher::kServingSliceUs;
  py::class_<PyBatcher>(m, "Batcher", R"doc(
Dynamic batcher for one model (see vivace.engine.runtime.ModelRunner for the Python side).

execute(executor, rows) is called on an executor thread, with the GIL, once per batch:
it reads `rows` rows from input_buffers(executor) and writes output_buffers(executor).
)doc")
      .def(py::init<const std::string&, int64_t, std::vector<int64_t>, int64_t, int, int, int64_t, bool,
                    int64_t, int64_t, std::vector<std::pair<std::string, std::vector<int64_t>>>,
                    std::vector<std::pair<std::string, std::vector<int64_t>>>, int, bool, py::object>(),
           py::arg("model_name"), py::arg("max_batch_size"), py::arg("preferred_batch_sizes"),
           py::arg("max_queue_delay_us"), py::arg("priority_levels"), py::arg("default_priority"),
           py::arg("default_timeout_us"), py::arg("allow_timeout_override"), py::arg("max_queue_size"),
           py::arg("shed_queue_wait_us"), py::arg("inputs"), py::arg("outputs"), py::arg("executors"), py::arg("inline_execution"),
           py::arg("execute"))
      .def("submit", &PyBatcher::Submit, py::arg("token"), py::arg("inputs"), py::arg("rows"),
           py::arg("priority") = 0, py::arg("timeout_us") = 0, py::arg("traced") = false)
      .def("drain", &PyBatcher::Drain)
      .def("take_traces", &PyBatcher::TakeTraces,
           "[(token, enqueued_ns, batch_start_ns, features_ns, batch_end_ns, batch_rows)] of the traced "
           "requests drained since the last call (CLOCK_MONOTONIC ns; 0: never ran)")
      .def("attach_feature_lookup", &PyBatcher::AttachFeatureLookup, py::arg("lookup"), py::arg("features"),
           "Serve by entity id: look up each batch's INT64 keys into per-executor float32 feature arrays")
      .def("set_native_forward", &PyBatcher::SetNativeForward, py::arg("model"), py::arg("forward"),
           py::arg("owner"), "Run batches with a native C kernel (capsules), without the GIL")
      .def("attach_sketches", &PyBatcher::AttachSketches, py::arg("input_sketch"), py::arg("output_sketch"),
           "Count each batch's first input and first output into DriftSketch objects (or None)")
      .def("enable_json", &PyBatcher::EnableJson, py::arg("model_name"), py::arg("model_version"),
           py::arg("inputs"), py::arg("outputs"),
           "Native JSON fast path: inputs/outputs as (name, datatype, row_shape); False if unsupported")
      .def("submit_json", &PyBatcher::SubmitJson, py::arg("token"), py::arg("body"), py::arg("priority") = 0,
           py::arg("timeout_us") = 0, py::arg("traced") = false,
           "Queue a JSON infer body; returns a Status code, or 100 when the general path must decode it")
      .def("run_ready", &PyBatcher::RunReady, py::arg("slice_us") = -1,
           "Inline mode: run the batches ready now (with slice_us >= 0, those that start within that "
           "many microseconds); returns microseconds until the next is due (0: ready now), or -1")
      .def("expire_due", &PyBatcher::ExpireDue,
           "Answer queued requests whose deadline passed (while executors are busy)")
      .def("cancel", &PyBatcher::Cancel, py::arg("token"))
      .def("fileno", &PyBatcher::fileno, "Readable when completed requests wait for drain()")
      .def("ready_fileno", &PyBatcher::ready_fileno,
           "Inline mode: readable when rows are queued and run_ready has not looked since (-1 otherwise)")
      .def("shutdown", &PyBatcher::Shutdown, py::arg("drain") = true)
      .def("input_buffers", [](PyBatcher& b, int e) { return b.Buffers(e, true); }, py::arg("executor"))
      .def("output_buffers", [](PyBatcher& b, int e) { return b.Buffers(e, false); }, py::arg("executor"))
      .def("stats", &PyBatcher::Stats)
      .def_property_readonly("queued_requests", &PyBatcher::queued_requests);

  py::enum_<Status>(m, "Status")
      .value("OK", Status::kOk)
      .value("QUEUE_FULL", Status::kQueueFull)
      .value("TIMEOUT", Status::kTimeout)
      .value("CANCELLED", Status::kCancelled)
      .value("ERROR", Status::kError)
      .value("SHUTDOWN", Status::kShutdown)
      .value("INVALID", Status::kInvalid)
      .value("OVERLOADED", Status::kOverloaded);
}

}  // namespace vivace
