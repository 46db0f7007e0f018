// CPU emulation (tests/cuda_emu): C accessors of the emulator's launch log and device state, linked
// into the emulated _C and read by tests/test_cuda_emulated.py through ctypes (the bindings in
// python_bindings/module.cpp stay exactly those of the real module).
#include <cstdint>
#include <cstring>
#include <mutex>

#include "emu_core.h"

#define FF_EMU_API extern "C" __attribute__((visibility("default")))

FF_EMU_API int ff_emu_launch_count() {
  std::lock_guard<std::mutex> lock(ff_emu::log_mutex);
  return int(ff_emu::launch_log.size());
}

FF_EMU_API void ff_emu_clear_launches() {
  std::lock_guard<std::mutex> lock(ff_emu::log_mutex);
  ff_emu::launch_log.clear();
}

// Launch i: kernel expression into name (NUL-terminated, truncated to name_len), grid xyz and
// block xyz into dims[6], stream, device, ok (1: ran without fault). Returns 0, or -1 for a bad i.
FF_EMU_API int ff_emu_launch_info(int i, char* name, int name_len, unsigned* dims,
                                  std::uint64_t* stream, int* device, int* ok) {
  std::lock_guard<std::mutex> lock(ff_emu::log_mutex);
  if (i < 0 || i >= int(ff_emu::launch_log.size()) || name_len < 1) return -1;
  const ff_emu::LaunchRecord& r = ff_emu::launch_log[size_t(i)];
  std::strncpy(name, r.kernel.c_str(), size_t(name_len - 1));
  name[name_len - 1] = '\0';
  const unsigned d[6] = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z};
  std::memcpy(dims, d, sizeof d);
  *stream = r.stream;
  *device = r.device;
  *ok = r.ok ? 1 : 0;
  return 0;
}

// The calling host thread's current device (the launchers must restore it after a call).
FF_EMU_API int ff_emu_current_device() { return ff_emu::current_device; }

#if FF_EMU_FAST_FIBERS
// The fiber switch of emu_core.h (x86-64 System V): the callee-saved state of the running context
// goes onto its own stack, its stack pointer into *save_sp (rdi); the other context's stack
// pointer (rsi) is loaded and its state popped. fiber_make() builds the frame a new fiber starts
// from, whose return address is ff_emu_fiber_start: it calls the fiber's entry (in r12), which
// never returns.
asm(R"(
    .text
    .globl ff_emu_switch
    .hidden ff_emu_switch
    .type ff_emu_switch, @function
ff_emu_switch:
    endbr64
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ff_emu_switch, .-ff_emu_switch

    .globl ff_emu_fiber_start
    .hidden ff_emu_fiber_start
    .type ff_emu_fiber_start, @function
ff_emu_fiber_start:
    endbr64
    callq *%r12
    ud2
    .size ff_emu_fiber_start, .-ff_emu_fiber_start
)");
#endif
