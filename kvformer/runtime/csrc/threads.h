// Sharing the decode step's work between threads: its own pool (Pool) or torch's OpenMP
// team, as set (threads_mode), in pieces (parallel_pieces, piece_of).
//
// The decode step's own worker threads: work split into pieces that whichever thread is
// running takes, one at a time, and a caller that never waits for a thread that has not
// started.
//
// Why not at::parallel_for (OpenMP): a decode step enters ~200 parallel regions, and each
// OpenMP region ends in a barrier that waits for every thread of the team. When anything
// else wants the same cores (the server's event loop and its HTTP clients, a compiler, a
// browser) one of those threads is often not running; the barrier then waits for the OS to
// schedule it again, up to a time slice (milliseconds) per region. On 2 cores with two
// other busy processes a batch-1 step measured 10x slower, not the 2x its share of the CPU
// would explain. Here the caller takes pieces too, and waits only for pieces that a worker
// has already taken: if no worker wakes, the caller does all the work and returns.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace kvf {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  // fn(i) for every i in [0, pieces), on the caller and on up to `threads - 1` workers
  template <typename F>
  void run(int64_t pieces, int threads, const F& fn) {
    if (pieces <= 1 || threads <= 1 || in_piece()) {
      for (int64_t i = 0; i < pieces; ++i) fn(i);
      return;
    }
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another thread's step holds the workers: run alone
      for (int64_t i = 0; i < pieces; ++i) fn(i);
      return;
    }
    ensure(threads - 1);
    active_.store(threads - 1, std::memory_order_relaxed);  // workers past it sit this out
    // publish the job, then its generation (with release: a worker that sees the new
    // generation sees the job); the piece counter lives in the low 32 bits of `next_`
    call_ = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
    fn_ = &fn;
    pieces_.store(pieces, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = ++gen_;  // 32 bits: consecutive jobs differ, which is all it takes
    // seq_cst here and on sleepers_ (both sides): a worker going to sleep either sees this
    // job or is seen as a sleeper and woken
    next_.store(uint64_t(gen) << 32, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> g(mu_);
      cv_.notify_all();
    }
    work(gen);
    // the pieces a worker has taken: it is running them, or the OS has taken its core
    // away meanwhile; then spinning here would only keep it waiting longer, so after a
    // short spin the caller sleeps until the last piece is counted
    for (int spin = 0; done_.load(std::memory_order_acquire) < pieces; ++spin) {
      if (spin < 2048) {
        cpu_relax();
        continue;
      }
      std::unique_lock<std::mutex> lk(mu_);
      waiting_.store(true, std::memory_order_seq_cst);
      done_cv_.wait(lk, [&] { return done_.load(std::memory_order_seq_cst) >= pieces; });
      waiting_.store(false, std::memory_order_relaxed);
    }
  }

  static Pool& get() {
    // a forked child has none of its parent's threads: it starts a pool of its own (the
    // parent's object is left as it is)
    static Pool* pool = nullptr;
    static pid_t owner = 0;
    static std::mutex mu;
    std::lock_guard<std::mutex> g(mu);
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool();  // never deleted: its detached threads may outlive main()
      owner = getpid();
    }
    return *pool;
  }

 private:
  static bool& in_piece() {
    thread_local bool flag = false;
    return flag;
  }

  // take and run pieces of job `gen` until there are none left (or a newer job started)
  void work(uint64_t gen) {
    uint64_t v = next_.load(std::memory_order_acquire);
    while ((v >> 32) == gen && int64_t(v & 0xffffffffu) < pieces_.load(std::memory_order_relaxed)) {
      if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      // piece i of job gen is ours: the job cannot end before we count it done, so its
      // function and piece count stay valid
      const int64_t total = pieces_.load(std::memory_order_relaxed);
      in_piece() = true;
      call_(fn_, int64_t(v & 0xffffffffu));
      in_piece() = false;
      // seq_cst with waiting_ (as sleepers_ with next_): the caller either sees the count
      // or is seen asleep and woken
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == total &&
          waiting_.load(std::memory_order_seq_cst)) {
        std::lock_guard<std::mutex> g(mu_);
        done_cv_.notify_all();
      }
      v = next_.load(std::memory_order_acquire);
    }
  }

  void ensure(int workers) {
    while (int(threads_) < workers) {
      const int index = threads_++;
      std::thread([this, index] { loop(index); }).detach();
    }
  }

  // worker `index` (0-based): it takes part in jobs that ask for more than `index` workers
  void loop(int index) {
    uint64_t seen = next_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      // spin ~50 us for the next job (the step's next matmul comes within microseconds),
      // then sleep, so that the cores are free between steps
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      uint64_t gen = 0;
      for (int spin = 0;; ++spin) {
        gen = next_.load(std::memory_order_acquire) >> 32;
        if (gen != seen) break;
        cpu_relax();
        if ((spin & 63) == 63 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return (next_.load(std::memory_order_seq_cst) >> 32) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = gen;
      if (index < active_.load(std::memory_order_relaxed)) work(gen);
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::atomic<bool> waiting_{false};  // the caller sleeps until the last piece is done
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  uint32_t gen_ = 0;  // written by the caller holding run_mu_
  std::atomic<int64_t> pieces_{0};
  const void* fn_ = nullptr;
  void (*call_)(const void*, int64_t) = nullptr;
  int threads_ = 0;
  std::atomic<int> active_{0};  // workers the current job may use (torch's threads - 1)
};

// ------------------------------------------------------------------ sharing work
// Who runs the pieces of a matmul or of attention: kvformer's own pool (Pool, above) or
// torch's OpenMP team (at::parallel_for). The pool only pays when torch's OpenMP threads sleep
// soon after their own work: with libgomp's default (spin ~300,000 times at every barrier)
// they keep the cores for a while after each torch op, and two teams spinning on two cores
// made a batch-1 step 1.6x slower. kvformer sets GOMP_SPINCOUNT=20000 (and KMP_BLOCKTIME=0)
// when it is imported before torch (kvformer/__init__.py); then the pool runs.
// KVFORMER_THREADS=pool|openmp overrides; the op `threads` reads or sets it.
enum class Threads { kPool, kOpenMP };

inline Threads default_threads() {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    std::string s = v ? v : "";
    for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  const std::string mode = env("KVFORMER_THREADS");
  if (mode == "pool") return Threads::kPool;
  if (mode == "openmp") return Threads::kOpenMP;
  if (env("OMP_WAIT_POLICY") == "passive") return Threads::kPool;
  const std::string spin = env("GOMP_SPINCOUNT");
  if (!spin.empty() && spin.find_first_not_of("0123456789") == std::string::npos &&
      spin.size() <= 6 && std::stol(spin) <= 100000)
    return Threads::kPool;
  return Threads::kOpenMP;
}

inline std::atomic<Threads>& threads_mode() {
  static std::atomic<Threads> mode{default_threads()};
  return mode;
}

// [0, n) in pieces of `piece` (rounded up to a multiple of `align`). On the pool each piece
// goes to whichever thread is free, and a thread the OS takes away for a while holds back
// at most the piece it is in (Pool); on OpenMP the same pieces are handed out inside one
// parallel region, whose closing barrier still waits for every thread of the team.
template <typename F>
void parallel_pieces(int64_t n, int64_t piece, int64_t align, const F& fn) {
  piece = std::max<int64_t>(align, (piece + align - 1) / align * align);
  const int64_t pieces = (n + piece - 1) / piece;
  const int threads = at::get_num_threads();
  auto one = [&](int64_t i) { fn(i * piece, std::min(n, (i + 1) * piece)); };
  if (threads_mode().load(std::memory_order_relaxed) == Threads::kPool) {
    kvf::Pool::get().run(pieces, threads, one);
    return;
  }
  if (pieces <= 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < pieces; ++i) one(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, pieces), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < pieces; i = next.fetch_add(1)) one(i);
  });
}

// "pool" or "openmp": set the step's threads to it; "": leave them. Returns the mode now.
inline std::string threads_op(std::string mode) {
  if (mode == "pool") {
    threads_mode() = Threads::kPool;
  } else if (mode == "openmp") {
    threads_mode() = Threads::kOpenMP;
  } else {
    TORCH_CHECK(mode.empty(), "kvformer_native: threads must be 'pool' or 'openmp', not '",
                mode, "'");
  }
  return threads_mode().load() == Threads::kPool ? "pool" : "openmp";
}

// The piece for n items of `work` each (bytes of weight times rows of x, or any like
// measure): about 8 pieces per thread, to even out a stolen time slice, but not below
// 64 KB of work (handing a piece out costs a shared atomic) nor above an equal share.
inline int64_t piece_of(int64_t n, int64_t work = 1 << 16) {
  const int64_t threads = at::get_num_threads();
  const int64_t fine = n / (8 * threads), least = ((1 << 16) + work - 1) / work;
  return std::min(std::max({int64_t(1), fine, least}), (n + threads - 1) / threads);
}

}  // namespace kvf
