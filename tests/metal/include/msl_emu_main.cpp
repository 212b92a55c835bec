// The emulator's driver: loads the buffers a manifest names, runs every threadgroup of the grid through the
// fiber scheduler of msl_emu.h, writes the outputs back. Included after the kernel and its entry shim
// (`mlxq_kernel_entry`), so one g++ invocation builds one executable per kernel source.
//
// Buffers sit at the end of their pages with an inaccessible page right after: reading or writing past the end
// of a buffer faults, and the fault is reported as an out-of-bounds access.
// (its system headers are included by msl_emu.h, before the address-space macros)

void run_kernel_thread(const mlxq_emu::ThreadInfo&);  // the entry shim the harness writes
extern void** kernel_buffers;

namespace mlxq_emu {

struct Buffer { std::string path, kind; size_t nbytes; char* data; };

inline char* guarded(size_t n) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t data_pages = (n + page - 1) / page + 1, guard = 16 * page;
  char* base = (char*)mmap(nullptr, data_pages * page + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) { std::perror("mmap"); std::exit(4); }
  mprotect(base + data_pages * page, guard, PROT_NONE);
  return base + data_pages * page - ((n + 15) / 16) * 16;  // 16-byte aligned; the guard follows within 15 bytes
}

inline void on_fault(int) {
  const char msg[] = "metal-emu: out-of-bounds access (a fault next to a buffer)\n";
  if (write(2, msg, sizeof(msg) - 1) < 0) {}
  _exit(5);
}

inline void fiber_main() {
  ::run_kernel_thread(fibers[current].info);
  fibers[current].state = DONE;
  swapcontext(&fibers[current].ctx, &scheduler);
}

// Runs one threadgroup to completion under `order` (0 forward, 1 reverse, 2 shuffled per round).
inline void run_group(std::vector<ThreadInfo>& threads, int order, std::mt19937& rng) {
  size_t n = threads.size();
  n_simd = (int)((n + SIMD - 1) / SIMD);
  slots.assign((size_t)2 * n_simd * SIMD * SLOT, 0);
  active_lanes.assign((size_t)2 * n_simd, 0);
  if (fibers.size() < n) fibers.resize(n);
  for (auto& b : tg_buffers) poison(b.ptr, b.size);
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.stack.resize(1 << 17);
    f.state = RUNNABLE;
    f.info = threads[i];
    f.simd_ops = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<size_t> ids(n);
  for (;;) {
    for (size_t i = 0; i < n; ++i) ids[i] = order == 1 ? n - 1 - i : i;
    if (order == 2) std::shuffle(ids.begin(), ids.end(), rng);
    for (size_t i : ids) {
      if (fibers[i].state != RUNNABLE) continue;
      current = (int)i;
      swapcontext(&scheduler, &fibers[i].ctx);
    }
    size_t done = 0, at_barrier = 0;
    for (size_t i = 0; i < n; ++i) {
      done += fibers[i].state == DONE;
      at_barrier += fibers[i].state == AT_BARRIER;
    }
    if (done == n) return;
    if (at_barrier + done == n && at_barrier) {
      if (done) { current = -1; fail("threadgroup_barrier: some threads of the group returned before it"); }
      for (size_t i = 0; i < n; ++i) fibers[i].state = RUNNABLE;
      continue;
    }
    bool released = false;
    for (int s = 0; s < n_simd; ++s) {
      uint32_t at = 0, live = 0;
      int kind = -1;
      bool same = true;
      for (int l = 0; l < SIMD && (size_t)(s * SIMD + l) < n; ++l) {
        Fiber& f = fibers[s * SIMD + l];
        if (f.state == DONE) continue;
        live |= 1u << l;
        if (f.state == AT_SIMD) {
          at |= 1u << l;
          if (kind >= 0 && (f.simd_kind != kind)) same = false;
          kind = f.simd_kind;
        }
      }
      if (!at || at != live) continue;
      if (!same) { current = s * SIMD; fail("simdgroup: lanes reached different simd operations"); }
      int parity = (fibers[s * SIMD + __builtin_ctz(at)].simd_ops - 1) & 1;
      active_lanes[parity * n_simd + s] = at;
      for (int l = 0; l < SIMD; ++l)
        if (at >> l & 1) fibers[s * SIMD + l].state = RUNNABLE;
      released = true;
    }
    if (!released) { current = -1; fail("deadlock: threads wait at a barrier or simd op others never reach"); }
  }
}

inline int main_impl(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: emu MANIFEST\n"); return 2; }
  std::signal(SIGSEGV, on_fault);
  std::signal(SIGBUS, on_fault);
  std::ifstream m(argv[1]);
  std::string word;
  uint g[3], t[3];
  int order;
  unsigned seed;
  size_t nbuf;
  int full_groups;  // CUDA: every block full size (MLX launches ceil(grid / block) of them)
  m >> word >> g[0] >> g[1] >> g[2] >> word >> t[0] >> t[1] >> t[2] >> word >> order >> seed >> word >> full_groups
    >> word >> nbuf;
  std::vector<Buffer> bufs(nbuf);
  std::vector<void*> ptrs(nbuf);
  for (auto& b : bufs) {
    m >> b.kind >> b.nbytes >> b.path;
    b.data = guarded(b.nbytes);
    if (b.kind == "out") {
      poison(b.data, b.nbytes);
    } else {
      std::ifstream in(b.path, std::ios::binary);
      in.read(b.data, (std::streamsize)b.nbytes);
      if ((size_t)in.gcount() != b.nbytes) { std::fprintf(stderr, "metal-emu: short read %s\n", b.path.c_str()); return 4; }
    }
  }
  for (size_t i = 0; i < nbuf; ++i) ptrs[i] = bufs[i].data;
  ::kernel_buffers = ptrs.data();
  // MLX dispatches `grid` threads in groups of min(threadgroup, grid); edge groups are partial
  uint tg[3] = {std::min(t[0], g[0]), std::min(t[1], g[1]), std::min(t[2], g[2])};
  uint ng[3] = {(g[0] + tg[0] - 1) / tg[0], (g[1] + tg[1] - 1) / tg[1], (g[2] + tg[2] - 1) / tg[2]};
  std::mt19937 rng(seed);
  std::vector<ThreadInfo> threads;
  for (uint gz = 0; gz < ng[2]; ++gz)
    for (uint gy = 0; gy < ng[1]; ++gy)
      for (uint gx = 0; gx < ng[0]; ++gx) {
        uint size[3] = {std::min(tg[0], g[0] - gx * tg[0]), std::min(tg[1], g[1] - gy * tg[1]),
                        std::min(tg[2], g[2] - gz * tg[2])};
        if (full_groups) std::copy(tg, tg + 3, size);
        uint count = size[0] * size[1] * size[2];
        threads.clear();
        for (uint z = 0; z < size[2]; ++z)
          for (uint y = 0; y < size[1]; ++y)
            for (uint x = 0; x < size[0]; ++x) {
              ThreadInfo i{};
              uint lin = (z * size[1] + y) * size[0] + x;
              i.thread_position_in_threadgroup = {x, y, z};
              i.threadgroup_position_in_grid = {gx, gy, gz};
              i.thread_position_in_grid = {gx * tg[0] + x, gy * tg[1] + y, gz * tg[2] + z};
              i.threads_per_grid = {g[0], g[1], g[2]};
              i.grid_size = {g[0], g[1], g[2]};
              i.grid_origin = {0, 0, 0};
              i.threads_per_threadgroup = {size[0], size[1], size[2]};
              i.dispatch_threads_per_threadgroup = {tg[0], tg[1], tg[2]};
              i.threadgroups_per_grid = {ng[0], ng[1], ng[2]};
              i.thread_index_in_threadgroup = lin;
              i.simdgroup_index_in_threadgroup = lin / SIMD;
              i.thread_index_in_simdgroup = lin % SIMD;
              i.simdgroups_per_threadgroup = (count + SIMD - 1) / SIMD;
              i.dispatch_simdgroups_per_threadgroup = (tg[0] * tg[1] * tg[2] + SIMD - 1) / SIMD;
              i.threads_per_simdgroup = SIMD;
              i.thread_execution_width = SIMD;
              i.quadgroup_index_in_threadgroup = lin / 4;
              i.thread_index_in_quadgroup = lin % 4;
              i.quadgroups_per_threadgroup = (count + 3) / 4;
              i.dispatch_quadgroups_per_threadgroup = (tg[0] * tg[1] * tg[2] + 3) / 4;
              threads.push_back(i);
            }
        run_group(threads, order, rng);
      }
  for (auto& b : bufs) {
    if (b.kind == "in") continue;
    std::ofstream out(b.path, std::ios::binary);
    out.write(b.data, (std::streamsize)b.nbytes);
  }
  return 0;
}

}  // namespace mlxq_emu

int main(int argc, char** argv) { return mlxq_emu::main_impl(argc, argv); }
