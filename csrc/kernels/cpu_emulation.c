// Makes a process see a CPU without AVX-512, AVX-VNNI or AMX, so that `vivace bench
// kernels --emulate-cpu avx2` measures every runtime (ours, onnxruntime's MLAS, torch's
// fbgemm, numpy) on the code paths it takes on an AVX2-only machine, in the same run.
//
// Loaded with LD_PRELOAD and VIVACE_EMULATE_CPU=avx2. Its constructor runs before the
// program's own code and asks the kernel to trap CPUID (arch_prctl ARCH_SET_CPUID, Linux
// >= 4.12 on a CPU or hypervisor with CPUID faulting); each CPUID then raises SIGSEGV, which
// the handler answers with the real result minus the hidden feature bits. The setting is
// inherited by threads and forks, and LD_PRELOAD by child processes. What ran before the
// constructor (the dynamic loader's choice of glibc's string functions) keeps the real CPU.
// Without VIVACE_EMULATE_CPU the library does nothing; where it cannot trap CPUID it stops
// the process rather than let a benchmark run unmasked under a masked label.
// Built for x86-64 Linux only (kernels.cmake).
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

// CPUID leaf 7 bits above AVX2: the AVX-512 family, AVX-VNNI and its relatives, AMX, AVX10.
static const uint32_t kLeaf7Ebx =
    (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31);
static const uint32_t kLeaf7Ecx = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
static const uint32_t kLeaf7Edx = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25);
static const uint32_t kLeaf7Sub1Eax = (1u << 4) | (1u << 5) | (1u << 21) | (1u << 23);
static const uint32_t kLeaf7Sub1Edx = (1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19);

static long SetCpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void AnswerCpuid(int signal_number, siginfo_t* info, void* context) {
  (void)info;
  greg_t* regs = ((ucontext_t*)context)->uc_mcontext.gregs;
  const unsigned char* ip = (const unsigned char*)regs[REG_RIP];
  if (ip[0] != 0x0f || ip[1] != 0xa2) {  // a real fault: let it crash as it would have
    signal(signal_number, SIG_DFL);
    return;
  }
  const int saved_errno = errno;
  const unsigned leaf = (unsigned)regs[REG_RAX], subleaf = (unsigned)regs[REG_RCX];
  unsigned eax, ebx, ecx, edx;
  SetCpuid(1);  // per thread: only this one sees the real CPUID, for one instruction
  __cpuid_count(leaf, subleaf, eax, ebx, ecx, edx);
  SetCpuid(0);
  if (leaf == 7 && subleaf == 0) {
    ebx &= ~kLeaf7Ebx;
    ecx &= ~kLeaf7Ecx;
    edx &= ~kLeaf7Edx;
  } else if (leaf == 7 && subleaf == 1) {
    eax &= ~kLeaf7Sub1Eax;
    edx &= ~kLeaf7Sub1Edx;
  }
  regs[REG_RAX] = eax;
  regs[REG_RBX] = ebx;
  regs[REG_RCX] = ecx;
  regs[REG_RDX] = edx;
  regs[REG_RIP] += 2;  // past the 2-byte CPUID instruction
  errno = saved_errno;
}

static void Fail(const char* what) {
  fprintf(stderr, "vivace CPU emulation (VIVACE_EMULATE_CPU=%s): %s\n", getenv("VIVACE_EMULATE_CPU"), what);
  _exit(2);
}

__attribute__((constructor)) static void HideCpuFeatures(void) {
  const char* target = getenv("VIVACE_EMULATE_CPU");
  if (target == NULL || target[0] == '\0') return;
  if (strcmp(target, "avx2") != 0) Fail("unknown target (expected avx2)");
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = AnswerCpuid;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGSEGV, &action, NULL) != 0) Fail(strerror(errno));
  if (SetCpuid(0) != 0)
    Fail("this CPU, hypervisor or kernel cannot trap the CPUID instruction (needs CPUID faulting, "
         "'cpuid_fault' in /proc/cpuinfo, and Linux >= 4.12)");
}
