// The runtime of cuda_emulation.h: fibers, the scheduler of a block's threads, barriers and
// shuffles, launch validation and the comparison of thread orders.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>

namespace ak_emu {

const ThreadIds* current_ids = nullptr;
Traffic traffic;

namespace {
// The elements of one tensor a launch has read and written, one bit each.
struct Footprint {
  size_t element_size;
  std::vector<uint64_t> read, written;
};
std::unordered_map<const void*, Footprint> footprints;
Traffic::Totals requested;
// Consecutive accesses mostly go to the tensor of the last one: its bits, without the map's lookup.
const void* last_base = nullptr;
bool last_read = false;
std::vector<uint64_t>* last_bits = nullptr;
}  // namespace

void Traffic::touch(bool read, const void* base, int64_t extent, size_t element_size, int64_t at, int64_t count) {
  (read ? requested.requested_read : requested.requested_written) += count * int64_t(element_size);
  if (last_bits == nullptr || base != last_base || read != last_read) {
    Footprint& f = footprints[base];
    std::vector<uint64_t>& bits = read ? f.read : f.written;
    if (bits.empty()) {
      f.element_size = element_size;
      bits.assign(size_t(extent + 63) / 64, 0);
    }
    last_base = base;
    last_read = read;
    last_bits = &bits;
  }
  std::vector<uint64_t>& bits = *last_bits;
  for (int64_t i = at; i < at + count; ++i) bits[size_t(i) / 64] |= uint64_t(1) << (i % 64);
}

Traffic::Totals Traffic::take() {
  Totals t = requested;
  for (const auto& [base, f] : footprints) {
    for (uint64_t w : f.read) t.read += __builtin_popcountll(w) * int64_t(f.element_size);
    for (uint64_t w : f.written) t.written += __builtin_popcountll(w) * int64_t(f.element_size);
  }
  footprints.clear();
  last_bits = nullptr;
  requested = Totals{};
  return t;
}

namespace {

// Switches stacks: saves the callee-saved registers and the floating-point control words on the
// current stack, stores its pointer in *save_sp, and resumes the stack load_sp (x86-64 System V).
extern "C" void ak_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl ak_emu_switch
  .hidden ak_emu_switch
  .type ak_emu_switch, @function
ak_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ak_emu_switch, .-ak_emu_switch
)");

enum class State { kRunnable, kBarrier, kShuffle, kDone };

struct Fiber {
  void* sp = nullptr;
  ThreadIds ids{};
  unsigned linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  State state = State::kRunnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  unsigned mask = 0;  // a shuffle's mask, source lane, value sent and value received
  unsigned src_lane = 0;
  uint64_t value = 0;
  uint64_t result = 0;
};

constexpr size_t kStackBytes = 128 * 1024;

// Fiber stacks, mapped once and reused by every block, each above a guard page.
char* stack_top(unsigned i) {
  static std::vector<char*> stacks;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("CUDA emulation: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    stacks.push_back(static_cast<char*>(p) + page + kStackBytes);
  }
  return stacks[i];
}

enum class Order { kForward, kReverse, kRandom };

struct ThreadOrder {
  Order order;
  uint64_t seed;
  std::string name;
};

struct Block {
  std::string kernel;
  dim3 grid, block;
  void (*run_thread)(const void*) = nullptr;
  const void* closure = nullptr;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  void* scheduler_sp = nullptr;
  std::exception_ptr error;
  bool in_block = false;
  uint3 block_idx{};
  // Shared memory: dynamic at the start of the arena, static arrays after it.
  alignas(16) unsigned char arena[kSharedPerBlock];
  size_t dynamic_bytes = 0;
  size_t static_end = 0;
  size_t shared_peak = 0;  // the launch's shared memory, dynamic and static (static_end of its blocks)
  std::vector<std::pair<const void*, size_t>> static_arrays;  // key, offset
};

Block* block_state() {
  static Block* b = new Block();  // never freed: fibers may be parked on it at exit
  return b;
}

std::string str(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}
std::string str(const dim3& v) { return str(uint3{v.x, v.y, v.z}); }
std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.find_last_of('/');
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

[[noreturn]] void fiber_main() {
  Block& b = *block_state();
  Fiber& f = *b.running;
  try {
    b.run_thread(b.closure);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  f.state = State::kDone;
  ak_emu_switch(&f.sp, b.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

// The initial stack of a fiber: what ak_emu_switch pops, returning into fiber_main.
void* initial_stack(char* top) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  *--sp = 0;                                            // fiber_main's "return address": never used
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);      // where ak_emu_switch returns
  for (int r = 0; r < 6; ++r) *--sp = 0;                // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  return sp;
}

void resume(Block& b, Fiber& f) {
  b.running = &f;
  current_ids = &f.ids;
  ak_emu_switch(&b.scheduler_sp, f.sp);
  b.running = nullptr;
  if (b.error) std::rethrow_exception(b.error);
}

// Parks the running fiber until the scheduler resumes it.
void wait_here(Fiber& f) {
  Block& b = *block_state();
  ak_emu_switch(&f.sp, b.scheduler_sp);
  current_ids = &f.ids;
}

// Completes the shuffles whose lanes have all arrived; true if any did.
bool release_shuffles(Block& b) {
  bool released = false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::kShuffle) continue;
    const unsigned warp_base = f.linear / kWarpSize * kWarpSize;
    bool ready = true;
    for (unsigned lane = 0; lane < unsigned(kWarpSize); ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      const Fiber& other = b.fibers[warp_base + lane];
      if (other.state == State::kDone) {
        fail("__shfl_xor_sync at " + site(f.file, f.line) + " with mask " + std::to_string(f.mask) + ": lane " +
             std::to_string(lane) + " named in the mask has exited");
      }
      if (other.state == State::kShuffle &&
          (other.file != f.file || other.line != f.line || other.mask != f.mask)) {
        fail("lanes of one mask at different shuffles: lane " + std::to_string(f.linear - warp_base) + " at " +
             site(f.file, f.line) + ", lane " + std::to_string(lane) + " at " + site(other.file, other.line));
      }
      ready = ready && other.state == State::kShuffle;
    }
    if (!ready) continue;
    for (unsigned lane = 0; lane < unsigned(kWarpSize); ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      Fiber& receiver = b.fibers[warp_base + lane];
      if (!(f.mask >> receiver.src_lane & 1u)) {
        fail("__shfl_xor_sync at " + site(f.file, f.line) + ": lane " + std::to_string(lane) + " reads lane " +
             std::to_string(receiver.src_lane) + ", which is not in the mask");
      }
      receiver.result = b.fibers[warp_base + receiver.src_lane].value;
    }
    for (unsigned lane = 0; lane < unsigned(kWarpSize); ++lane) {
      if (f.mask >> lane & 1u) b.fibers[warp_base + lane].state = State::kRunnable;
    }
    released = true;
  }
  return released;
}

// Releases the block's barrier when every thread waits at it; fails on a barrier that cannot be
// completed (threads exited, or waiting at another barrier or at a shuffle).
void release_barrier(Block& b) {
  const Fiber* first = nullptr;
  unsigned waiting = 0, exited = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) {
      ++exited;
    } else if (f.state == State::kBarrier) {
      ++waiting;
      if (!first) first = &f;
      if (f.file != first->file || f.line != first->line) {
        fail("threads wait at different __syncthreads(): " + site(first->file, first->line) + " and " +
             site(f.file, f.line));
      }
    } else {  // a shuffle that can never complete
      const unsigned warp_base = f.linear / kWarpSize * kWarpSize;
      for (unsigned lane = 0; lane < unsigned(kWarpSize); ++lane) {
        const Fiber& other = b.fibers[std::min<size_t>(warp_base + lane, b.fibers.size() - 1)];
        if ((f.mask >> lane & 1u) && other.state == State::kBarrier) {
          fail("deadlock: thread " + str(f.ids.thread_idx) + " waits at __shfl_xor_sync at " + site(f.file, f.line) +
               " for lane " + std::to_string(lane) + ", which waits at __syncthreads() at " +
               site(other.file, other.line));
        }
      }
      fail("deadlock at __shfl_xor_sync at " + site(f.file, f.line));
    }
  }
  if (exited) {
    fail("__syncthreads() at " + site(first->file, first->line) + " reached by " + std::to_string(waiting) + " of " +
         std::to_string(b.fibers.size()) + " threads; the other " + std::to_string(exited) + " have exited");
  }
  for (Fiber& f : b.fibers) f.state = State::kRunnable;
}

void run_block(Block& b, const ThreadOrder& order, std::mt19937_64& rng) {
  const unsigned threads = unsigned(b.fibers.size());
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f = Fiber();
    f.linear = t;
    f.ids.thread_idx = {t % b.block.x, t / b.block.x % b.block.y, t / (b.block.x * b.block.y)};
    f.ids.block_idx = b.block_idx;
    f.ids.block_dim = b.block;
    f.ids.grid_dim = b.grid;
    f.sp = initial_stack(stack_top(t));
  }
  // Fresh shared memory, all bits set (NaN in floating point), as a block must not read what it
  // has not written.
  std::memset(b.arena, 0xff, b.dynamic_bytes);
  b.static_end = (b.dynamic_bytes + 15) / 16 * 16;
  b.static_arrays.clear();

  std::vector<unsigned> sequence(threads);
  for (unsigned t = 0; t < threads; ++t) sequence[t] = order.order == Order::kReverse ? threads - 1 - t : t;
  unsigned done = 0;
  while (done < threads) {
    if (order.order == Order::kRandom) std::shuffle(sequence.begin(), sequence.end(), rng);
    for (unsigned t : sequence) {
      if (b.fibers[t].state == State::kRunnable) resume(b, b.fibers[t]);
    }
    done = unsigned(std::count_if(b.fibers.begin(), b.fibers.end(),
                                  [](const Fiber& f) { return f.state == State::kDone; }));
    if (done < threads && !release_shuffles(b)) release_barrier(b);
  }
}

std::vector<ThreadOrder> thread_orders() {
  // ATTN_KERNELS_EMULATION_ORDERS: comma-separated forward, reverse, random:SEED.
  const char* env = std::getenv("ATTN_KERNELS_EMULATION_ORDERS");
  std::string spec = env && *env ? env : "forward,reverse";
  std::vector<ThreadOrder> orders;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item == "forward") {
      orders.push_back({Order::kForward, 0, item});
    } else if (item == "reverse") {
      orders.push_back({Order::kReverse, 0, item});
    } else if (item.rfind("random:", 0) == 0) {
      orders.push_back({Order::kRandom, std::stoull(item.substr(7)), item});
    } else {
      throw Error("ATTN_KERNELS_EMULATION_ORDERS: unknown thread order '" + item +
                  "'; use forward, reverse or random:SEED, comma-separated");
    }
  }
  return orders;
}

// The block indices a launch runs along a grid dimension of `size`, in the order's sequence
// (ascending, descending, shuffled): all of them, or with ATTN_KERNELS_EMULATION_GRID=edges only
// the first two and the last two, for tests of launches at the grid's limits (the other blocks'
// outputs are left unwritten), or with =none none (the launch is validated and logged: the
// ledger's launch configurations at shapes too large to run).
std::vector<unsigned> block_indices(unsigned size, const ThreadOrder& order, std::mt19937_64& rng) {
  const char* env = std::getenv("ATTN_KERNELS_EMULATION_GRID");
  const std::string mode = env ? env : "";
  if (!mode.empty() && mode != "all" && mode != "edges" && mode != "none") {
    throw Error("ATTN_KERNELS_EMULATION_GRID: unknown mode '" + mode + "'; use all, edges or none");
  }
  std::vector<unsigned> indices;
  for (unsigned i = 0; i < size && mode != "none"; ++i) {
    if (mode == "edges" && i == 2 && size > 4) i = size - 2;
    indices.push_back(i);
  }
  if (order.order == Order::kReverse) std::reverse(indices.begin(), indices.end());
  if (order.order == Order::kRandom) std::shuffle(indices.begin(), indices.end(), rng);
  return indices;
}

void validate(const std::string& kernel, dim3 grid, dim3 block, size_t dynamic_bytes) {
  std::string why;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    why = "grid " + str(grid) + " has a zero dimension";
  } else if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    why = "grid " + str(grid) + " exceeds (2147483647, 65535, 65535)";
  } else if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024u || block.y > 1024u || block.z > 64u ||
             uint64_t(block.x) * block.y * block.z > kMaxThreadsPerBlock) {
    why = "block " + str(block) + " is not within (1024, 1024, 64) and 1024 threads";
  } else if (dynamic_bytes > kSharedPerBlock) {
    why = std::to_string(dynamic_bytes) + " bytes of dynamic shared memory exceed the " +
          std::to_string(kSharedPerBlock) + " a block has without opting in";
  }
  if (!why.empty()) throw Error("CUDA error: invalid configuration argument (emulated launch of " + kernel + ": " + why + ")");
}

std::mutex launch_mutex;
std::string launch_log;
bool logging_launches = false;

std::string csv(const dim3& v) {
  return std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z);
}

}  // namespace

std::string take_launch_log(bool keep_logging) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  std::string log;
  log.swap(launch_log);
  logging_launches = keep_logging;
  return log;
}

std::string where() {
  const Block& b = *block_state();
  std::string s = " [in " + b.kernel;
  if (b.in_block) s += ", block " + str(b.block_idx);
  if (b.running) s += ", thread " + str(b.running->ids.thread_idx);
  return s + "]";
}

void fail(const std::string& what) { throw Error("CUDA emulation: " + what + where()); }

void barrier(const char* file, int line) {
  Fiber& f = *block_state()->running;
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  wait_here(f);
}

uint64_t shuffle(unsigned mask, uint64_t value, int lane_mask, int width, const char* file, int line) {
  Block& b = *block_state();
  Fiber& f = *b.running;
  const unsigned lane = f.linear % kWarpSize;
  const unsigned warp_base = f.linear - lane;
  const unsigned lanes = std::min<unsigned>(kWarpSize, unsigned(b.fibers.size()) - warp_base);
  if (!(mask >> lane & 1u)) {
    fail("__shfl_xor_sync at " + site(file, line) + ": the calling lane " + std::to_string(lane) +
         " is not in its mask " + std::to_string(mask));
  }
  if (lanes < unsigned(kWarpSize) && (mask >> lanes) != 0) {
    fail("__shfl_xor_sync at " + site(file, line) + ": mask " + std::to_string(mask) + " names lanes beyond the " +
         std::to_string(lanes) + " this warp has");
  }
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail("__shfl_xor_sync at " + site(file, line) + ": width " + std::to_string(width) +
         " is not a power of two up to 32");
  }
  // A lane reading from a later group of `width` lanes gets its own value back.
  unsigned src = lane ^ unsigned(lane_mask);
  if (src >= unsigned(kWarpSize) || src / unsigned(width) > lane / unsigned(width)) src = lane;
  f.state = State::kShuffle;
  f.mask = mask;
  f.src_lane = src;
  f.value = value;
  f.file = file;
  f.line = line;
  wait_here(f);
  return f.result;
}

void* dynamic_shared(size_t* bytes) {
  Block& b = *block_state();
  *bytes = b.dynamic_bytes;
  return b.arena;
}

void* static_shared(const void* key, size_t bytes) {
  Block& b = *block_state();
  for (const auto& [k, offset] : b.static_arrays) {
    if (k == key) return b.arena + offset;
  }
  const size_t offset = b.static_end;
  if (offset + bytes > kSharedPerBlock) {
    throw Error("CUDA error: invalid configuration argument (emulated launch of " + b.kernel + ": " +
                std::to_string(b.dynamic_bytes) + " bytes of dynamic and " + std::to_string(offset + bytes - b.static_end) +
                "+ of static shared memory exceed the " + std::to_string(kSharedPerBlock) + " of a block)");
  }
  std::memset(b.arena + offset, 0xff, bytes);
  b.static_arrays.emplace_back(key, offset);
  b.static_end = (offset + bytes + 15) / 16 * 16;
  b.shared_peak = std::max(b.shared_peak, offset + bytes);
  return b.arena + offset;
}

std::string kernel_name(const char* pretty_function) {
  std::string s = pretty_function;
  const std::string tag = "kKernel = ";
  size_t begin = s.find(tag);
  if (begin == std::string::npos) return s;
  begin += tag.size();
  size_t end = begin;
  for (int depth = 0; end < s.size(); ++end) {
    const char c = s[end];
    if (c == '<' || c == '(') ++depth;
    if (c == '>' || c == ')') --depth;
    if (depth == 0 && (c == ';' || c == ']')) break;
  }
  std::string name = s.substr(begin, end - begin);
  for (const std::string noise : {"attn_kernels::", "{anonymous}::", "(& ", "&"}) {
    for (size_t at; (at = name.find(noise)) != std::string::npos;) name.erase(at, noise.size());
  }
  return name;
}

void launch(const std::string& kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
            void (*run_thread)(const void*), const void* closure, const std::vector<Output>& outputs) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  validate(kernel, grid, block, dynamic_shared_bytes);
  Block& b = *block_state();
  b.kernel = kernel;
  b.grid = grid;
  b.block = block;
  b.run_thread = run_thread;
  b.closure = closure;
  b.dynamic_bytes = dynamic_shared_bytes;
  b.shared_peak = 0;
  b.fibers.assign(size_t(block.x) * block.y * block.z, Fiber());
  b.error = nullptr;
  uint64_t blocks_run = 0;

  const std::vector<ThreadOrder> orders = thread_orders();
  std::vector<std::vector<unsigned char>> initial, first_result;  // snapshots, for a second order
  for (size_t i = 0; i < outputs.size() && orders.size() > 1; ++i) {
    const auto* p = static_cast<const unsigned char*>(outputs[i].data);
    initial.emplace_back(p, p + outputs[i].bytes);
  }
  for (size_t k = 0; k < orders.size(); ++k) {
    for (size_t i = 0; i < outputs.size() && k > 0; ++i) std::memcpy(outputs[i].data, initial[i].data(), outputs[i].bytes);
    std::mt19937_64 rng(orders[k].seed);
    traffic.take();
    traffic.on = k == 0 && logging_launches;  // counting costs a lookup per access: only for the ledger
    try {
      for (unsigned z : block_indices(grid.z, orders[k], rng)) {
        for (unsigned y : block_indices(grid.y, orders[k], rng)) {
          for (unsigned x : block_indices(grid.x, orders[k], rng)) {
            b.block_idx = {x, y, z};
            b.in_block = true;
            run_block(b, orders[k], rng);
            blocks_run += k == 0;
          }
        }
      }
    } catch (...) {
      traffic.on = false;
      traffic.take();
      b.in_block = false;
      b.running = nullptr;
      current_ids = nullptr;
      throw;
    }
    b.in_block = false;
    current_ids = nullptr;
    traffic.on = false;
    if (k == 0 && logging_launches) {
      const Traffic::Totals t = traffic.take();
      launch_log += kernel + "\t" + csv(grid) + "\t" + csv(block) + "\t" + std::to_string(dynamic_shared_bytes) + "\t" +
                    std::to_string(b.shared_peak) + "\t" + std::to_string(t.read) + "\t" + std::to_string(t.written) +
                    "\t" + std::to_string(t.requested_read) + "\t" + std::to_string(t.requested_written) + "\t" +
                    std::to_string(blocks_run) + "\n";
    }
    for (size_t i = 0; i < outputs.size() && orders.size() > 1; ++i) {
      const auto* p = static_cast<const unsigned char*>(outputs[i].data);
      if (k == 0) {
        first_result.emplace_back(p, p + outputs[i].bytes);
      } else if (std::memcmp(first_result[i].data(), p, outputs[i].bytes) != 0) {
        size_t byte = 0;
        while (first_result[i][byte] == p[byte]) ++byte;
        fail("race: '" + std::string(outputs[i].name ? outputs[i].name : "?") + "'[" +
             std::to_string(byte / outputs[i].element_size) + "] differs between thread orders " + orders[0].name +
             " and " + orders[k].name);
      }
    }
  }
}

}  // namespace ak_emu
