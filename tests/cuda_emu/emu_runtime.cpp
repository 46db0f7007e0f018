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
