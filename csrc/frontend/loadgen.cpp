#include "frontend/loadgen.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string_view>
#include <thread>

namespace vivace {
namespace {

constexpr uint64_t kTimerTag = ~uint64_t{0};

double Clock() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// The value of header `name` (lowercase, with its colon) in a head whose names are
// compared case-insensitively; empty when absent.
std::string_view HeaderValue(std::string_view head, std::string_view name) {
  for (size_t line = head.find("\r\n"); line != std::string_view::npos; line = head.find("\r\n", line + 2)) {
    const size_t start = line + 2;
    if (head.size() - start < name.size()) break;
    bool same = true;
    for (size_t i = 0; i < name.size() && same; ++i) {
      same = static_cast<char>(std::tolower(static_cast<unsigned char>(head[start + i]))) == name[i];
    }
    if (!same) continue;
    size_t from = start + name.size();
    while (from < head.size() && head[from] == ' ') ++from;
    const size_t end = head.find("\r\n", from);
    return head.substr(from, (end == std::string_view::npos ? head.size() : end) - from);
  }
  return {};
}

class Generator {
 public:
  explicit Generator(const LoadSpec& spec) : spec_(spec) {
    if (spec.port <= 0 || spec.port > 65535) throw std::invalid_argument("port must be within 1..65535");
    if (spec.request.empty()) throw std::invalid_argument("the request is empty");
    if (!(spec.rate > 0.0) && spec.concurrency <= 0) throw std::invalid_argument("give a rate or a concurrency");
    if (!(spec.duration_s > 0.0)) throw std::invalid_argument("duration_s must be positive");
    if (spec.max_connections <= 0) throw std::invalid_argument("max_connections must be positive");
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    timer_fd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epoll_fd_ < 0 || timer_fd_ < 0) throw std::runtime_error(std::string("load generator: ") + strerror(errno));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kTimerTag;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, timer_fd_, &ev);
  }

  ~Generator() {
    for (Client& c : clients_) {
      if (c.fd >= 0) close(c.fd);
    }
    close(timer_fd_);
    close(epoll_fd_);
  }

  std::vector<LoadOutcome> Run() {
    start_ = Clock();
    const bool open_loop = spec_.rate > 0.0;
    const double schedule_end = open_loop ? spec_.duration_s : spec_.warmup_s + spec_.duration_s;
    const size_t total = open_loop ? static_cast<size_t>(spec_.rate * spec_.duration_s) : 0;
    if (open_loop) outcomes_.reserve(total);
    if (!open_loop) {
      for (int i = 0; i < spec_.concurrency; ++i) Submit(NewOutcome(0.0));
    }
    size_t next = 0;  // open loop: the next request of the schedule
    epoll_event events[256];
    for (;;) {
      const double now = Elapsed();
      while (open_loop && next < total && static_cast<double>(next) / spec_.rate <= now) {
        Submit(NewOutcome(static_cast<double>(next) / spec_.rate));
        ++next;
      }
      closed_loop_open_ = !open_loop && now < schedule_end;
      double wake_at;  // answers wake the loop before this
      if (open_loop && next < total) {
        wake_at = static_cast<double>(next) / spec_.rate;
      } else if (!open_loop && now < schedule_end) {
        wake_at = schedule_end;
      } else if (pending_ > 0 && now < schedule_end + spec_.answer_timeout_s) {
        wake_at = schedule_end + spec_.answer_timeout_s;
      } else {
        break;
      }
      ArmTimer(wake_at);
      const int n = epoll_wait(epoll_fd_, events, 256, -1);
      if (n < 0 && errno != EINTR) throw std::runtime_error(std::string("epoll_wait: ") + strerror(errno));
      for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 == kTimerTag) {
          uint64_t expirations;
          while (read(timer_fd_, &expirations, sizeof(expirations)) > 0) {
          }
          continue;
        }
        OnEvent(static_cast<size_t>(events[i].data.u64), events[i].events);
      }
    }
    for (LoadOutcome& o : outcomes_) {
      if (o.status == 0 && o.error == LoadError::kNone) o.error = LoadError::kUnanswered;
      o.scheduled += start_;  // times of CLOCK_MONOTONIC, as the caller's clock reads them
      if (o.sent > 0.0) o.sent += start_;
      if (o.answered > 0.0) o.answered += start_;
    }
    if (!open_loop) {  // the window only: what the warm-up sent is not reported
      std::vector<LoadOutcome> window;
      for (LoadOutcome& o : outcomes_) {
        if (o.scheduled >= start_ + spec_.warmup_s) window.push_back(std::move(o));
      }
      return window;
    }
    return std::move(outcomes_);
  }

 private:
  struct Client {
    int fd = -1;
    bool connecting = false;
    bool idle = false;
    int64_t current = -1;  // index of the outcome in flight
    size_t written = 0;
    std::string in;
  };

  double Elapsed() const { return Clock() - start_; }

  size_t NewOutcome(double scheduled) {
    LoadOutcome o;
    o.scheduled = scheduled;
    outcomes_.push_back(std::move(o));
    ++pending_;
    return outcomes_.size() - 1;
  }

  void ArmTimer(double at) {
    const double absolute = start_ + std::max(at, 0.0);
    itimerspec spec{};
    spec.it_value.tv_sec = static_cast<time_t>(absolute);
    spec.it_value.tv_nsec = static_cast<long>((absolute - std::floor(absolute)) * 1e9);
    if (spec.it_value.tv_sec == 0 && spec.it_value.tv_nsec == 0) spec.it_value.tv_nsec = 1;
    timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &spec, nullptr);
  }

  void Submit(size_t outcome) {
    while (!idle_.empty()) {
      const size_t slot = idle_.back();
      idle_.pop_back();
      Client& c = clients_[slot];
      if (c.fd < 0 || !c.idle) continue;  // closed while idle
      c.idle = false;
      Send(slot, outcome);
      return;
    }
    if (open_connections_ < spec_.max_connections) {
      Open(outcome);
    } else {
      backlog_.push_back(outcome);
    }
  }

  void Open(size_t outcome) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      Finish(outcome, LoadError::kRefused);
      return;
    }
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(spec_.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const int rc = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
    if (rc != 0 && errno != EINPROGRESS) {
      close(fd);
      Finish(outcome, LoadError::kRefused);
      return;
    }
    size_t slot;
    if (!free_.empty()) {
      slot = free_.back();
      free_.pop_back();
    } else {
      slot = clients_.size();
      clients_.emplace_back();
    }
    Client& c = clients_[slot];
    c = Client{};
    c.fd = fd;
    c.connecting = rc != 0;
    ++open_connections_;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    ev.data.u64 = slot;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    if (c.connecting) {
      c.current = static_cast<int64_t>(outcome);  // sent once connected
    } else {
      Send(slot, outcome);
    }
  }

  void Send(size_t slot, size_t outcome) {
    Client& c = clients_[slot];
    c.current = static_cast<int64_t>(outcome);
    c.written = 0;
    outcomes_[outcome].sent = Elapsed();
    Write(slot);
  }

  void Write(size_t slot) {
    Client& c = clients_[slot];
    while (c.written < spec_.request.size()) {
      const ssize_t n = send(c.fd, spec_.request.data() + c.written, spec_.request.size() - c.written, MSG_NOSIGNAL);
      if (n > 0) {
        c.written += static_cast<size_t>(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        break;
      } else {
        Drop(slot, LoadError::kLost);
        return;
      }
    }
    Watch(slot, c.written < spec_.request.size());
  }

  void Watch(size_t slot, bool writes) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | (writes ? EPOLLOUT : 0u);
    ev.data.u64 = slot;
    epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, clients_[slot].fd, &ev);
  }

  void OnEvent(size_t slot, uint32_t events) {
    Client& c = clients_[slot];
    if (c.fd < 0) return;
    if (c.connecting) {
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        Drop(slot, LoadError::kRefused);
        return;
      }
      if (!(events & (EPOLLOUT | EPOLLIN))) return;
      c.connecting = false;
      Send(slot, static_cast<size_t>(c.current));
      return;
    }
    if ((events & EPOLLOUT) && c.current >= 0 && c.written < spec_.request.size()) {
      Write(slot);
      if (clients_[slot].fd < 0) return;
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) Read(slot);
  }

  void Read(size_t slot) {
    char buffer[65536];
    for (;;) {
      Client& c = clients_[slot];
      const ssize_t n = recv(c.fd, buffer, sizeof(buffer), 0);
      if (n > 0) {
        c.in.append(buffer, static_cast<size_t>(n));
        if (!Parse(slot)) return;  // closed
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      Drop(slot, LoadError::kLost);  // the server closed (or reset) the connection
      return;
    }
  }

  // Takes every whole response in the client's buffer; false once the client is closed.
  bool Parse(size_t slot) {
    for (;;) {
      Client& c = clients_[slot];
      const size_t head_end = c.in.find("\r\n\r\n");
      if (head_end == std::string::npos) return true;
      const std::string_view head(c.in.data(), head_end + 2);
      const std::string_view length = HeaderValue(head, "content-length:");
      size_t body_size = 0;
      for (char ch : length) {
        if (ch < '0' || ch > '9') break;
        body_size = body_size * 10 + static_cast<size_t>(ch - '0');
      }
      const size_t end = head_end + 4 + body_size;
      if (c.in.size() < end) return true;
      const bool close_after = HeaderValue(head, "connection:").substr(0, 5) == "close";
      if (c.current < 0) {  // an answer to nothing asked (a timeout notice): the connection ends
        Close(slot);
        return false;
      }
      LoadOutcome& o = outcomes_[static_cast<size_t>(c.current)];
      o.status = c.in.size() >= 12 ? std::atoi(c.in.substr(9, 3).c_str()) : 0;
      o.retry_after = !HeaderValue(head, "retry-after:").empty();
      const std::string_view body(c.in.data() + head_end + 4, body_size);
      if (o.status == 200) {
        constexpr std::string_view kVersion = "\"model_version\":\"";
        const size_t at = body.find(kVersion);
        if (at != std::string_view::npos) {
          const size_t from = at + kVersion.size();
          o.version = std::string(body.substr(from, body.find('"', from) - from));
        }
      } else {
        o.body = std::string(body.substr(0, 256));
      }
      const size_t done = static_cast<size_t>(c.current);
      c.current = -1;
      c.in.erase(0, end);
      if (close_after) {
        Close(slot);
      } else {
        c.idle = true;
        idle_.push_back(slot);
      }
      Finish(done, LoadError::kNone);  // may send the next request on this connection
      if (close_after || clients_[slot].fd < 0) return false;
    }
  }

  // The connection failed: its request in flight ends with `error`.
  void Drop(size_t slot, LoadError error) {
    const int64_t current = clients_[slot].current;
    Close(slot);
    if (current >= 0) Finish(static_cast<size_t>(current), error);
  }

  void Close(size_t slot) {
    Client& c = clients_[slot];
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    c = Client{};
    --open_connections_;
    free_.push_back(slot);
  }

  void Finish(size_t outcome, LoadError error) {
    LoadOutcome& o = outcomes_[outcome];
    o.error = error;
    if (error == LoadError::kNone) o.answered = Elapsed();
    --pending_;
    // The freed connection (or a new one) takes what waited for a connection first.
    if (!backlog_.empty() && (!idle_.empty() || open_connections_ < spec_.max_connections)) {
      const size_t waiting = backlog_.front();
      backlog_.pop_front();
      Submit(waiting);
    } else if (closed_loop_open_) {
      Submit(NewOutcome(Elapsed()));
    }
  }

  LoadSpec spec_;
  int epoll_fd_ = -1, timer_fd_ = -1;
  double start_ = 0.0;
  std::vector<LoadOutcome> outcomes_;
  std::vector<Client> clients_;
  std::vector<size_t> free_, idle_;
  std::deque<size_t> backlog_;
  int open_connections_ = 0;
  size_t pending_ = 0;
  bool closed_loop_open_ = false;
};

}  // namespace

std::vector<LoadOutcome> RunLoad(const LoadSpec& spec) {
  Generator generator(spec);  // setup errors are thrown here, on the caller's thread
  std::vector<LoadOutcome> outcomes;
  std::exception_ptr failure;
  // Its own thread, so that pinning it leaves the caller's affinity as it was.
  std::thread runner([&] {
    if (spec.cpu >= 0) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(spec.cpu, &set);
      pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    try {
      outcomes = generator.Run();
    } catch (...) {
      failure = std::current_exception();
    }
  });
  runner.join();
  if (failure) std::rethrow_exception(failure);
  return outcomes;
}

}  // namespace vivace
