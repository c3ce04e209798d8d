// kiln-grpc-front: a replica's gRPC front end in C++ (serving/native/README.md).
//
// It answers Open Inference Protocol V2 over gRPC (inference.GRPCInferenceService) on the
// node's shared gRPC port (SO_REUSEPORT, as every replica of the node opens it), and hands
// every message, as its serialised bytes, to its own replica over HTTP/1.1 on a Unix socket:
//
//   POST /v2/grpc/<Method>      x-kiln-front: <token>, the call's metadata as headers
//   -> 200, grpc-status, grpc-message (percent-encoded), the response message's bytes
//
// The replica (serving/grpc_v2.py `GrpcBridge`) parses, checks, batches, logs and answers as
// for any gRPC call; this process only terminates gRPC, which in Python cost more of the
// replica's core than everything Kiln does with a call (docs/design-notes.md, issue 32).
// It reads no message itself: unknown methods answer UNIMPLEMENTED, ModelStreamInfer's
// messages are handed over one at a time and answered in order.
//
// Usage: kiln-grpc-front --listen HOST:PORT --upstream /path/to.sock [--connections N]
// The token comes in the environment (KILN_GRPC_FRONT_TOKEN). It prints "listening" once
// the port is open, stops gracefully on SIGTERM or SIGINT, and dies with its parent.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

const char kService[] = "/inference.GRPCInferenceService/";
const std::set<std::string> kMethods = {
    "ServerLive", "ServerReady",  "ServerMetadata", "ModelReady",
    "ModelMetadata", "ModelConfig", "ModelInfer",   "ModelStreamInfer"};
// Metadata that is HTTP's own framing, or the front's: never forwarded as a header.
const std::set<std::string> kReserved = {
    "content-length", "host", "connection", "transfer-encoding", "te", "keep-alive",
    "upgrade", "x-kiln-front", "content-type", "expect"};

std::string g_upstream;
std::string g_token;

// ------------------------------------------------------------------ HTTP/1.1 to the replica

struct Answer {
  bool ok = false;
  std::string error;  // why no answer came (ok false)
  int grpc_status = 0;
  std::string grpc_message;
  std::string body;
};

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string PercentDecoded(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size()) {
      int hi = HexValue(text[i + 1]);
      int lo = HexValue(text[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out.push_back(text[i]);
  }
  return out;
}

// One whole answer at the front of `in`: true and `answer` filled (its bytes taken from
// `in`); false while more bytes are needed; `answer->error` set when it cannot be read.
bool ParseAnswer(std::string* in, Answer* answer, bool* close_after) {
  size_t end = in->find("\r\n\r\n");
  if (end == std::string::npos) {
    if (in->size() > (1u << 20)) answer->error = "the replica's answer head is too long";
    return false;
  }
  long length = -1;
  int status = 0;
  size_t line_start = 0;
  bool first = true;
  while (line_start < end) {
    size_t line_end = in->find("\r\n", line_start);
    if (line_end == std::string::npos || line_end > end) line_end = end;
    std::string line = in->substr(line_start, line_end - line_start);
    line_start = line_end + 2;
    if (first) {
      first = false;
      size_t space = line.find(' ');
      status = space == std::string::npos ? 0 : atoi(line.c_str() + space + 1);
      continue;
    }
    size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    for (auto& c : name) c = static_cast<char>(tolower(c));
    size_t from = colon + 1;
    while (from < line.size() && line[from] == ' ') ++from;
    std::string value = line.substr(from);
    if (name == "content-length") length = atol(value.c_str());
    else if (name == "grpc-status") answer->grpc_status = atoi(value.c_str());
    else if (name == "grpc-message") answer->grpc_message = PercentDecoded(value);
    else if (name == "connection" && value == "close") *close_after = true;
  }
  if (length < 0) {
    answer->error = "the replica's answer had no content-length";
    return false;
  }
  if (in->size() < end + 4 + static_cast<size_t>(length)) return false;
  answer->body = in->substr(end + 4, static_cast<size_t>(length));
  in->erase(0, end + 4 + static_cast<size_t>(length));
  if (status != 200) {  // not the bridge's answer (a wrong token, a replica stopping)
    answer->grpc_status = status == 503 ? grpc::StatusCode::UNAVAILABLE
                                        : grpc::StatusCode::INTERNAL;
    answer->grpc_message = "the replica answered HTTP " + std::to_string(status);
    answer->body.clear();
  }
  answer->ok = true;
  return true;
}

// Hands requests to the replica over up to `connections` keep-alive connections, one request
// in flight on each (the replica batches what arrives together; a pipelined connection
// would be answered one request at a time), from one thread on epoll: a burst of answers
// after a batch is read in one wake-up, where a thread per connection took one each.
class Relay {
 public:
  using Done = std::function<void(Answer)>;

  explicit Relay(int connections) : conns_(static_cast<size_t>(connections)) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.u64 = kWake;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, wake_, &event);
    for (size_t i = 0; i < conns_.size(); ++i) idle_.push_back(i);
    thread_ = std::thread([this] { Run(); });
  }

  void Submit(std::string request, Done done) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      incoming_.push_back({std::move(request), std::move(done)});
      wake = sleeping_;
      sleeping_ = false;
    }
    if (wake) {
      uint64_t one = 1;
      ssize_t ignored = write(wake_, &one, sizeof(one));
      (void)ignored;
    }
  }

 private:
  static constexpr uint64_t kWake = ~0ull;
  struct Job {
    std::string request;
    Done done;
  };
  struct Conn {
    int fd = -1;
    std::string out;
    size_t sent = 0;
    std::string in;
    Done done;  // set while a request is in flight
  };

  void Run() {
    std::vector<epoll_event> events(64);
    for (;;) {
      TakeIncoming();
      {
        // Asleep from here: a request submitted after this wakes the thread (Submit).
        std::lock_guard<std::mutex> lock(mu_);
        if (!incoming_.empty()) continue;
        sleeping_ = true;
      }
      int n = epoll_wait(epoll_, events.data(), static_cast<int>(events.size()), -1);
      {
        std::lock_guard<std::mutex> lock(mu_);
        sleeping_ = false;
      }
      if (n < 0) n = 0;
      for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 == kWake) {
          uint64_t count;
          ssize_t ignored = read(wake_, &count, sizeof(count));
          (void)ignored;
          continue;
        }
        size_t index = static_cast<size_t>(events[i].data.u64);
        if (events[i].events & EPOLLOUT) Write(index);
        if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) Read(index);
      }
    }
  }

  // New requests join the waiting ones; as many start as there are idle connections (the
  // others start as answers free connections: every answer is an epoll event).
  void TakeIncoming() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (!incoming_.empty()) {
        waiting_.push_back(std::move(incoming_.front()));
        incoming_.pop_front();
      }
    }
    while (!waiting_.empty() && !idle_.empty()) {
      size_t index = idle_.back();
      idle_.pop_back();
      Job job = std::move(waiting_.front());
      waiting_.pop_front();
      Start(index, std::move(job));
    }
  }

  void Start(size_t index, Job job) {
    Conn& conn = conns_[index];
    if (conn.fd >= 0 && !StillOpen(conn.fd)) Close(index);
    if (conn.fd < 0 && !Connect(index)) {
      Answer answer;
      answer.error = "the replica is not reachable (" + std::string(strerror(errno)) + ")";
      idle_.push_back(index);
      job.done(std::move(answer));
      return;
    }
    conn.out = std::move(job.request);
    conn.sent = 0;
    conn.in.clear();
    conn.done = std::move(job.done);
    Write(index);
  }

  // An idle kept connection the replica closed meanwhile (uvicorn's keep-alive timeout)
  // reads as ready with nothing in it: a new one is opened before sending, and nothing is
  // ever sent twice.
  static bool StillOpen(int fd) {
    pollfd p{fd, POLLIN, 0};
    return poll(&p, 1, 0) == 0;
  }

  bool Connect(size_t index) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, g_upstream.c_str(), sizeof(addr.sun_path) - 1);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      int saved = errno;
      close(fd);
      errno = saved;
      return false;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    epoll_event event{};
    event.events = EPOLLIN | EPOLLRDHUP;
    event.data.u64 = index;
    epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &event);
    conns_[index].fd = fd;
    return true;
  }

  void Close(size_t index) {
    Conn& conn = conns_[index];
    if (conn.fd >= 0) {
      epoll_ctl(epoll_, EPOLL_CTL_DEL, conn.fd, nullptr);
      close(conn.fd);
    }
    conn.fd = -1;
    conn.in.clear();
  }

  void Write(size_t index) {
    Conn& conn = conns_[index];
    if (!conn.done) return;
    while (conn.sent < conn.out.size()) {
      ssize_t n = send(conn.fd, conn.out.data() + conn.sent, conn.out.size() - conn.sent,
                       MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        Watch(index, EPOLLIN | EPOLLRDHUP | EPOLLOUT);
        return;
      }
      if (n <= 0) {
        Fail(index, "the replica closed the connection");
        return;
      }
      conn.sent += static_cast<size_t>(n);
    }
    conn.out.clear();
    conn.out.shrink_to_fit();
    Watch(index, EPOLLIN | EPOLLRDHUP);
  }

  void Watch(size_t index, uint32_t events) {
    epoll_event event{};
    event.events = events;
    event.data.u64 = index;
    epoll_ctl(epoll_, EPOLL_CTL_MOD, conns_[index].fd, &event);
  }

  void Read(size_t index) {
    Conn& conn = conns_[index];
    if (conn.fd < 0) return;
    char chunk[65536];
    bool closed = false;
    for (;;) {
      ssize_t n = recv(conn.fd, chunk, sizeof(chunk), 0);
      if (n > 0) {
        conn.in.append(chunk, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      closed = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
      break;
    }
    if (!conn.done) {  // an idle connection: only its closing is news
      if (closed) Close(index);
      return;
    }
    Answer answer;
    bool close_after = false;
    if (ParseAnswer(&conn.in, &answer, &close_after)) {
      Done done = std::move(conn.done);
      conn.done = nullptr;
      if (close_after || closed) Close(index);
      idle_.push_back(index);
      done(std::move(answer));
      return;
    }
    if (!answer.error.empty()) Fail(index, answer.error);
    else if (closed) Fail(index, "the replica's answer was cut short");
  }

  void Fail(size_t index, const std::string& why) {
    Conn& conn = conns_[index];
    Done done = std::move(conn.done);
    conn.done = nullptr;
    Close(index);
    idle_.push_back(index);
    Answer answer;
    answer.error = why;
    if (done) done(std::move(answer));
  }

  std::vector<Conn> conns_;
  std::vector<size_t> idle_;
  std::deque<Job> waiting_;  // the relay thread's own
  std::mutex mu_;
  std::deque<Job> incoming_;
  bool sleeping_ = true;
  int epoll_ = -1;
  int wake_ = -1;
  std::thread thread_;
};

// ------------------------------------------------------------------ one call

std::string Flattened(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

grpc::ByteBuffer Buffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

class Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(grpc::GenericCallbackServerContext* context, Relay* relay) : relay_(relay) {
    const std::string& path = context->method();
    const size_t prefix = sizeof(kService) - 1;
    if (path.compare(0, prefix, kService) != 0 || !kMethods.count(path.substr(prefix))) {
      Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "Method not found: " + path));
      return;
    }
    method_ = path.substr(prefix);
    streaming_ = method_ == "ModelStreamInfer";
    for (const auto& [key, value] : context->client_metadata()) {
      std::string name(key.data(), key.size());
      if (name.empty() || name[0] == ':' || kReserved.count(name) ||
          (name.size() > 4 && name.compare(name.size() - 4, 4, "-bin") == 0)) {
        continue;
      }
      headers_ += name + ": " + std::string(value.data(), value.size()) + "\r\n";
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client sent all it will (a stream) or nothing at all (unary)
      Finish(streaming_ ? grpc::Status::OK
                        : grpc::Status(grpc::StatusCode::INTERNAL, "no request message"));
      return;
    }
    std::string body = Flattened(request_);
    std::string request = "POST /v2/grpc/" + method_ + " HTTP/1.1\r\nhost: kiln\r\n" +
                          "x-kiln-front: " + g_token + "\r\ncontent-length: " +
                          std::to_string(body.size()) + "\r\n" + headers_ + "\r\n" + body;
    relay_->Submit(std::move(request), [this](Answer answer) { Answered(std::move(answer)); });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    if (streaming_) StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  // On the relay's thread: the replica's answer (or why none came).
  void Answered(Answer answer) {
    if (!answer.ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, answer.error));
      return;
    }
    if (answer.grpc_status != 0) {
      Finish(grpc::Status(static_cast<grpc::StatusCode>(answer.grpc_status),
                          answer.grpc_message));
      return;
    }
    response_ = Buffer(answer.body);
    if (streaming_) {
      StartWrite(&response_);
    } else {
      StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
    }
  }

  Relay* relay_;
  std::string method_;
  std::string headers_;
  bool streaming_ = false;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
};

class Service final : public grpc::CallbackGenericService {
 public:
  explicit Service(Relay* relay) : relay_(relay) {}
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    return new Call(context, relay_);
  }

 private:
  Relay* relay_;
};

int Usage(const char* why) {
  fprintf(stderr, "kiln-grpc-front: %s\nusage: kiln-grpc-front --listen HOST:PORT "
                  "--upstream SOCKET [--connections N]\n", why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // Die with the replica that started this process, whatever kills it.
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  const pid_t parent = getppid();
  std::string listen;
  int connections = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--listen") listen = argv[i + 1];
    else if (flag == "--upstream") g_upstream = argv[i + 1];
    else if (flag == "--connections") connections = atoi(argv[i + 1]);
    else return Usage(("unknown option " + flag).c_str());
  }
  if (listen.empty() || g_upstream.empty()) return Usage("--listen and --upstream are needed");
  if (connections < 1 || connections > 1024) return Usage("--connections takes 1 to 1024");
  const char* token = getenv("KILN_GRPC_FRONT_TOKEN");
  if (token == nullptr || !*token) return Usage("KILN_GRPC_FRONT_TOKEN is not set");
  g_token = token;

  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);  // every thread after this one too

  Relay relay(connections);
  Service service(&relay);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 1);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    fprintf(stderr, "kiln-grpc-front: could not listen on %s\n", listen.c_str());
    return 1;
  }
  if (getppid() != parent) return 0;  // the parent died before PDEATHSIG was set
  printf("listening\n");
  fflush(stdout);

  int received = 0;
  sigwait(&stop_signals, &received);
  // Refuse new calls, give those in flight up to 10 s (as the Python listener did).
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
  _exit(0);  // the relay's thread waits on epoll: nothing else to wait for
}
