// Python face of the native HTTP front end (vivace.engine.frontend drives it).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "batcher/py_batcher.h"
#include "frontend/frontend.h"
#include "frontend/loadgen.h"
#include "frontend/otlp.h"

namespace py = pybind11;

namespace vivace {
namespace {

py::bytes Bytes(const std::string& s) { return py::bytes(s.data(), s.size()); }

class PyFrontend {
 public:
  PyFrontend(int listen_fd, int64_t max_connections, int64_t max_body_bytes, int64_t max_header_bytes,
             int64_t max_headers, double header_timeout_s, double body_timeout_s, double idle_timeout_s) {
    FrontendLimits limits;
    limits.max_connections = max_connections;
    limits.max_body_bytes = max_body_bytes;
    limits.max_header_bytes = max_header_bytes;
    limits.max_headers = max_headers;
    limits.header_timeout_s = header_timeout_s;
    limits.body_timeout_s = body_timeout_s;
    limits.idle_timeout_s = idle_timeout_s;
    frontend_ = std::make_unique<HttpFrontend>(listen_fd, limits);
  }

  ~PyFrontend() { Stop(); }

  static std::shared_ptr<InferRoute> RouteOf(py::handle batcher, py::handle model, py::handle version) {
    JsonEndpoint endpoint = JsonEndpointOf(batcher);
    auto route = std::make_shared<InferRoute>();
    route->batcher = std::move(endpoint.batcher);
    route->codec = std::move(endpoint.codec);
    route->row_elements = endpoint.row_elements;
    route->model = model.cast<std::string>();
    route->version = version.cast<std::string>();
    return route;
  }

  // routes: [(target, batcher, model, version)], or for a weighted rollout
  // [(target, batcher, model, version, canary_batcher, canary_version, canary_percent)]
  void SetRoutes(py::list routes) {
    std::unordered_map<std::string, std::shared_ptr<const InferRoute>> table;
    for (py::handle item : routes) {
      auto entry = item.cast<py::tuple>();
      auto route = RouteOf(entry[1], entry[2], entry[3]);
      if (entry.size() == 7) {
        const double percent = entry[6].cast<double>();
        if (!(percent >= 0.0 && percent <= 100.0)) throw py::value_error("canary_percent must be within 0..100");
        route->canary = RouteOf(entry[4], entry[2], entry[5]);
        route->canary_per_million = static_cast<uint32_t>(percent * 10000.0 + 0.5);
      } else if (entry.size() != 4) {
        throw py::value_error("a route is (target, batcher, model, version[, canary_batcher, canary_version, percent])");
      }
      table[entry[0].cast<std::string>()] = std::move(route);
    }
    py::gil_scoped_release nogil;  // the old routes may hold the last reference to a batcher
    frontend_->SetRoutes(std::move(table));
  }

  // [(target, answered by the stable version, by the canary)] since the last call
  py::list TakeRouted() {
    std::vector<RoutedCounts> counts;
    {
      py::gil_scoped_release nogil;
      counts = frontend_->TakeRouted();
    }
    py::list out;
    for (const RoutedCounts& c : counts) out.append(py::make_tuple(c.target, c.stable, c.canary));
    return out;
  }

  void SetAuth(bool required, py::list grants, std::vector<std::string> open_paths) {
    std::vector<TokenGrant> table;
    for (py::handle item : grants) {
      auto entry = item.cast<py::tuple>();
      TokenGrant g;
      const std::string digest = entry.size() == 4 ? entry[0].cast<std::string>() : std::string();
      if (digest.size() != g.digest.size())
        throw py::value_error("a grant is (32-byte SHA-256 digest, expires_at, infer, name)");
      std::memcpy(g.digest.data(), digest.data(), g.digest.size());
      g.expires_at = entry[1].cast<double>();
      g.infer = entry[2].cast<bool>();
      g.name = entry[3].cast<std::string>();
      table.push_back(std::move(g));
    }
    frontend_->SetAuth(required, std::move(table), std::move(open_paths));
  }

  void SetDriven(py::list batchers) {
    std::vector<std::shared_ptr<Batcher>> driven;
    for (py::handle b : batchers) driven.push_back(NativeBatcherOf(b));
    py::gil_scoped_release nogil;
    frontend_->SetDriven(std::move(driven));
  }

  void Respond(uint64_t conn, uint64_t seq, py::bytes response) {
    frontend_->Respond(conn, seq, std::string(response));
  }

  // [(conn, seq, method, target, body, header_length | None, authorization | None, peer | None,
  // trace | None)]; seq is -1 (and the rest None) for a connection that closed. trace is
  // (traceparent | None, tracestate | None, received_ns) when the request carried trace
  // context or tracing is on.
  py::list Take() {
    std::vector<ForwardedRequest> requests = frontend_->Take();
    py::list out(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      ForwardedRequest& f = requests[i];
      py::tuple t;
      if (f.closed) {
        t = py::make_tuple(f.conn, -1, py::none(), py::none(), py::none(), py::none(), py::none(), py::none(),
                           py::none());
      } else {
        t = py::make_tuple(f.conn, static_cast<int64_t>(f.seq), Bytes(f.method), Bytes(f.target), Bytes(f.body),
                           f.has_header_length ? py::object(Bytes(f.header_length)) : py::object(py::none()),
                           f.has_authorization ? py::object(Bytes(f.authorization)) : py::object(py::none()),
                           f.peer.empty() ? py::object(py::none()) : py::object(py::str(f.peer)),
                           f.has_traceparent || f.has_tracestate || f.received_ns != 0
                               ? py::object(py::make_tuple(
                                     f.has_traceparent ? py::object(Bytes(f.traceparent)) : py::object(py::none()),
                                     f.has_tracestate ? py::object(Bytes(f.tracestate)) : py::object(py::none()),
                                     f.received_ns))
                               : py::object(py::none()));
      }
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), t.release().ptr());
    }
    return out;
  }

  // (spans, count, requests, dropped): the traced fast-path requests answered since the
  // last call, encoded as OTLP ScopeSpans.spans fields (otlp.h), their times moved from
  // CLOCK_MONOTONIC to the Unix epoch by `epoch_offset_ns`; dropped: requests whose
  // timings did not fit the queue.
  py::tuple TakeTraceSpans(int64_t epoch_offset_ns) {
    uint64_t dropped = 0;
    std::string spans;
    int count = 0;
    size_t requests = 0;
    {
      py::gil_scoped_release nogil;
      std::vector<TraceRecord> records = frontend_->TakeTraces(&dropped);
      requests = records.size();
      auto epoch = [epoch_offset_ns](int64_t ns) { return ns == 0 ? 0 : ns + epoch_offset_ns; };
      for (const TraceRecord& t : records) {
        otlp::RequestSpans r;
        if (t.has_parent) {
          r.trace_id = t.trace_id.data();
          r.parent_id = t.parent_id.data();
        }
        r.trace_state = t.tracestate;
        r.method = "POST";
        r.target = t.target;
        r.frontend = "native";
        r.model = t.model;
        r.version = t.version;
        r.status = t.status;
        r.rows = t.rows;
        r.batch_rows = t.batch_rows;
        r.received = epoch(t.received_ns);
        r.parsed = epoch(t.parsed_ns);
        r.enqueued = epoch(t.enqueued_ns);
        r.batch_start = epoch(t.batch_start_ns);
        r.features = epoch(t.features_ns);
        r.batch_end = epoch(t.batch_end_ns);
        r.answered = epoch(t.answered_ns);
        count += otlp::AppendRequestSpans(r, &spans);
      }
    }
    return py::make_tuple(Bytes(spans), count, requests, dropped);
  }

  void Stop() {
    if (!frontend_) return;
    py::gil_scoped_release nogil;
    frontend_->Stop();
  }

  HttpFrontend& get() { return *frontend_; }

  py::dict HttpErrors() const {
    py::dict d;
    for (const auto& [status, count] : frontend_->HttpErrors()) d[py::int_(status)] = count;
    return d;
  }

  py::dict Failures() const {
    py::dict d;
    for (const auto& [key, count] : frontend_->Failures())
      d[py::make_tuple(std::get<0>(key), std::get<1>(key), std::get<2>(key))] = count;
    return d;
  }

 private:
  std::unique_ptr<HttpFrontend> frontend_;
};

}  // namespace

void BindFrontend(py::module_& m) {
  py::class_<PyFrontend>(m, "HttpFrontend", R"doc(
Native HTTP/1.1 server on a listening socket (one epoll thread).

JSON infer requests whose target has a route (set_routes) are parsed into the model's
batcher and answered natively; every other request is handed to Python: fileno() becomes
readable, take() returns them, and respond() sends each answer (in request order).
)doc")
      .def(py::init<int, int64_t, int64_t, int64_t, int64_t, double, double, double>(), py::arg("listen_fd"),
           py::arg("max_connections"), py::arg("max_body_bytes"), py::arg("max_header_bytes"), py::arg("max_headers"),
           py::arg("header_timeout"), py::arg("body_timeout"), py::arg("idle_timeout"))
      .def("set_routes", &PyFrontend::SetRoutes, py::arg("routes"),
           "Fast routes: [(target, batcher, model, version)] for batchers with the JSON path on, or "
           "(target, batcher, model, version, canary_batcher, canary_version, canary_percent) for a weighted rollout")
      .def("take_routed", &PyFrontend::TakeRouted,
           "[(target, stable count, canary count)] of the split routes since the last call")
      .def("set_auth", &PyFrontend::SetAuth, py::arg("required"), py::arg("grants"), py::arg("open_paths"),
           "Bearer auth: with required, only fast-path requests presenting a grant [(sha256 digest of the "
           "token, expires_at or 0, infer scope, name)] with the infer scope are answered natively; "
           "others go to Python")
      .def("set_driven", &PyFrontend::SetDriven, py::arg("batchers"),
           "Inline batchers with a native kernel whose batches the front end's thread runs itself")
      .def("respond", &PyFrontend::Respond, py::arg("conn"), py::arg("seq"), py::arg("response"))
      .def("take", &PyFrontend::Take)
      .def("set_tracing", [](PyFrontend& f, bool on, double ratio) { f.get().SetTracing(on, ratio); },
           py::arg("on"), py::arg("ratio"),
           "Trace fast-path requests: a sampled traceparent always, an unsampled one never, none by ratio")
      .def("take_trace_spans", &PyFrontend::TakeTraceSpans, py::arg("epoch_offset_ns"),
           "(spans, count, requests, dropped): the traced fast-path requests answered since the last call, "
           "as encoded OTLP ScopeSpans.spans fields")
      .def("fileno", [](PyFrontend& f) { return f.get().python_fd(); })
      .def("stop_accepting", [](PyFrontend& f) { f.get().StopAccepting(); })
      .def("begin_drain", [](PyFrontend& f) { f.get().BeginDrain(); })
      .def("in_flight", [](PyFrontend& f) { return f.get().InFlight(); })
      .def("connections", [](PyFrontend& f) { return f.get().Connections(); })
      .def("http_errors", &PyFrontend::HttpErrors)
      .def("failures", &PyFrontend::Failures)
      .def("stop", &PyFrontend::Stop);

  m.def(
      "parse_traceparent",
      [](py::bytes value) -> py::object {
        const std::string text(value);
        http::TraceParent t;
        if (!http::ParseTraceparent(text.data(), text.size(), &t)) return py::none();
        return py::make_tuple(py::bytes(reinterpret_cast<const char*>(t.trace_id), 16),
                              py::bytes(reinterpret_cast<const char*>(t.parent_id), 8), t.flags);
      },
      py::arg("value"), "The native parser's reading of a traceparent: (trace_id, parent_id, flags) or None");

  m.def(
      "encode_request_spans",
      [](std::optional<std::string> trace_id, std::optional<std::string> parent_id, const std::string& trace_state,
         const std::string& method, const std::string& target, const std::string& frontend, const std::string& model,
         const std::string& version, std::optional<int> status, int64_t rows, int64_t batch_rows, int64_t received,
         int64_t parsed, int64_t enqueued, int64_t batch_start, int64_t features, int64_t batch_end,
         int64_t answered) {
        if ((trace_id && trace_id->size() != 16) || (parent_id && parent_id->size() != 8) ||
            trace_id.has_value() != parent_id.has_value())
          throw py::value_error("trace_id (16 bytes) and parent_id (8 bytes) come together or not at all");
        otlp::RequestSpans r;
        if (trace_id) {
          r.trace_id = reinterpret_cast<const uint8_t*>(trace_id->data());
          r.parent_id = reinterpret_cast<const uint8_t*>(parent_id->data());
        }
        r.trace_state = trace_state;
        r.method = method;
        r.target = target;
        r.frontend = frontend;
        r.model = model;
        r.version = version;
        r.status = status.value_or(0);
        r.rows = rows;
        r.batch_rows = batch_rows;
        r.received = received;
        r.parsed = parsed;
        r.enqueued = enqueued;
        r.batch_start = batch_start;
        r.features = features;
        r.batch_end = batch_end;
        r.answered = answered;
        std::string spans;
        const int count = otlp::AppendRequestSpans(r, &spans);
        return py::make_tuple(Bytes(spans), count);
      },
      py::arg("trace_id"), py::arg("parent_id"), py::arg("trace_state"), py::arg("method"), py::arg("target"),
      py::arg("frontend"), py::arg("model") = "", py::arg("version") = "", py::arg("status") = py::none(),
      py::arg("rows") = 0, py::arg("batch_rows") = 0, py::arg("received") = 0, py::arg("parsed") = 0,
      py::arg("enqueued") = 0, py::arg("batch_start") = 0, py::arg("features") = 0, py::arg("batch_end") = 0,
      py::arg("answered") = 0,
      "(spans, count): one traced request's spans as encoded OTLP ScopeSpans.spans fields (times in Unix ns, "
      "0: did not happen; no model: a route other than infer, the server span alone)");

  m.def(
      "http_load",
      [](int port, py::bytes request, double rate, int concurrency, double duration_s, double warmup_s,
         int max_connections, double answer_timeout_s, int cpu) {
        LoadSpec spec;
        spec.port = port;
        spec.request = request;
        spec.rate = rate;
        spec.concurrency = concurrency;
        spec.duration_s = duration_s;
        spec.warmup_s = warmup_s;
        spec.max_connections = max_connections;
        spec.answer_timeout_s = answer_timeout_s;
        spec.cpu = cpu;
        std::vector<LoadOutcome> outcomes;
        {
          py::gil_scoped_release nogil;
          outcomes = RunLoad(spec);
        }
        py::list out(outcomes.size());
        for (size_t i = 0; i < outcomes.size(); ++i) {
          const LoadOutcome& o = outcomes[i];
          out[i] = py::make_tuple(o.scheduled, o.sent, o.answered, o.status, o.retry_after,
                                  static_cast<int>(o.error), o.version, Bytes(o.body));
        }
        return out;
      },
      py::arg("port"), py::arg("request"), py::arg("rate") = 0.0, py::arg("concurrency") = 0,
      py::arg("duration_s") = 1.0, py::arg("warmup_s") = 0.0, py::arg("max_connections") = 512,
      py::arg("answer_timeout_s") = 10.0, py::arg("cpu") = -1,
      R"doc(Sends `request` (a whole HTTP/1.1 request) to 127.0.0.1:`port` from a native thread (pinned
to `cpu` when >= 0): open loop at `rate` per second for `duration_s`, new keep-alive
connections opened as needed up to `max_connections`; or, with rate 0, closed loop with
`concurrency` clients (`warmup_s` not reported). Returns [(scheduled, sent, answered,
status, retry_after, error, model_version, body)]: times in seconds of time.monotonic()
(CLOCK_MONOTONIC), sent and answered 0 when that did not happen; error is 0
(answered), 1 (connect refused), 2 (connection lost) or 3 (unanswered in time).)doc");
}

}  // namespace vivace
