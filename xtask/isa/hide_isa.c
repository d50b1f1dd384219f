// Hides CPU extensions from run-time feature detection, at native speed.
//
// Loaded with LD_PRELOAD by `cargo xtask hide-isa`. Its constructor turns on CPUID faulting
// (arch_prctl(ARCH_SET_CPUID, 0), Linux 4.12+, where the CPU or hypervisor offers `cpuid_fault`)
// and catches the SIGSEGV each `cpuid` then raises: the handler runs the real instruction with
// faulting briefly off, clears the bits of the hidden extensions and steps over the instruction.
// Everything that asks CPUID at run time (Rust's std_detect, gemm, oneDNN, MKL, PyTorch's
// cpuinfo) then sees a CPU without them; code compiled in unconditionally is not affected.
// The faulting setting is inherited by threads and reset by execve, where LD_PRELOAD loads this
// library again. Programs that install their own SIGSEGV handler (Rust's std for stack overflows,
// rustc) get it chained behind this one: `sigaction` and `signal` are wrapped so that their
// handler is called for every fault that is not a `cpuid`.
//
// HIDE_ISA=avx512 hides AVX-512 (every subset), AVX-VNNI, AVX-IFMA and AMX: what an AVX2-only
// CPU such as Zen 3 offers. HIDE_ISA_VERBOSE=1 prints the number of faults at exit.

#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static volatile unsigned long faults;
static int installed;
// the program's own SIGSEGV action, called for real faults
static struct sigaction chained;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (real == NULL) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

int sigaction(int sig, const struct sigaction *action, struct sigaction *old) {
    if (sig == SIGSEGV && installed) {
        if (old != NULL) *old = chained;
        if (action != NULL) chained = *action;
        return 0;
    }
    return real_sigaction()(sig, action, old);
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction action, old;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(sig, &action, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

static long set_cpuid(unsigned long enabled) {
    return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled);
}

static void hide(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        // EBX: avx512f 16, dq 17, ifma 21, pf 26, er 27, cd 28, bw 30, vl 31
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                (1u << 30) | (1u << 31));
        // ECX: vbmi 1, vbmi2 6, vnni 11, bitalg 12, vpopcntdq 14
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        // EDX: 4vnniw 2, 4fmaps 3, vp2intersect 8, amx-bf16 22, avx512fp16 23, amx-tile 24,
        // amx-int8 25
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        // EAX: avx-vnni 4, avx512-bf16 5, amx-fp16 21, avx-ifma 23; EDX: avx-vnni-int8 4,
        // avx-ne-convert 5, amx-complex 8, avx10 19
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        *d &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 19));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        // AMX palette and TMUL information, AVX10
        *a = *b = *c = *d = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    // a faulting `cpuid` is a general-protection fault (SI_KERNEL); only then is the
    // instruction pointer known to be readable
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
        set_cpuid(1);
        __cpuid_count(leaf, sub, a, b, c, d);
        set_cpuid(0);
        hide(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        faults++;
        return;
    }
    // a real fault: the program's handler, or the default action when this returns and the
    // instruction faults again
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else {
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        installed = 0;
        real_sigaction()(sig, &fallback, NULL);
    }
}

static void report(void) {
    fprintf(stderr, "hide-isa: %lu cpuid calls answered in pid %d\n", faults, (int)getpid());
}

__attribute__((constructor)) static void hide_isa_init(void) {
    const char *what = getenv("HIDE_ISA");
    if (what == NULL || strcmp(what, "avx512") != 0) {
        fprintf(stderr, "hide-isa: HIDE_ISA must be `avx512`\n");
        _exit(2);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    chained.sa_handler = SIG_DFL;
    if (real_sigaction()(SIGSEGV, &action, NULL) != 0 || set_cpuid(0) != 0) {
        fprintf(stderr, "hide-isa: this CPU or kernel offers no CPUID faulting (`cpuid_fault` "
                        "in /proc/cpuinfo)\n");
        _exit(2);
    }
    installed = 1;
    if (getenv("HIDE_ISA_VERBOSE") != NULL) atexit(report);
}
